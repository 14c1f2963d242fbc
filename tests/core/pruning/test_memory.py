"""Weights of a memory-mapped checkpoint: written into memory of their own, the file's pages let go."""

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from core.pruning import memory, models

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self; Linux only")


def rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def mapped(path, **tensors):
    """The tensors as safetensors maps them (as transformers loads a checkpoint): views of the file."""
    save_file(tensors, path)
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in tensors}


@linux_only
def test_a_weight_mapped_from_a_checkpoint_is_recognised(tmp_path):
    t = mapped(tmp_path / "w.safetensors", a=torch.randn(256, 256))["a"]
    assert memory.file_mapped([t])[0]
    assert not memory.file_mapped([torch.randn(256, 256)])[0]
    assert not memory.file_mapped([t[1:]])[0]  # part of a storage: other views may read the rest


@linux_only
def test_a_mapped_weight_moves_out_before_it_is_written_and_the_file_pages_go(tmp_path):
    a, b, c = torch.randn(1024, 1024), torch.randn(64, 1024), torch.randn(64, 1024)
    w = mapped(tmp_path / "w.safetensors", a=a, b=b, c=c)
    layer, neighbour, warm = (nn.Linear(1024, n, bias=False).requires_grad_(False) for n in (1024, 64, 64))
    layer.weight.data, neighbour.weight.data, warm.weight.data = w["a"], w["b"], w["c"]
    float(layer.weight.sum() + neighbour.weight.sum())  # read once: the file's pages are resident
    pruned = a.masked_fill(a.abs() < 0.5, 0)
    models.own_weights([warm])  # the first call maps code and libraries: not measured
    neighbour.weight.data[0].zero_()  # written in place: b's first page (shared with a's last) is now a copy
    before = rss_file_kib()
    models.own_weights([layer])
    models.set_weight(layer, pruned)
    assert torch.equal(layer.weight, pruned) and not memory.file_mapped([layer.weight])[0]
    assert torch.equal(neighbour.weight[1:], b[1:]) and not neighbour.weight[0].any()  # that page stayed
    assert before - rss_file_kib() >= 0.9 * 4096  # a's 4 MiB of file pages are no longer held
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("a"), a)  # the checkpoint itself is untouched


@linux_only
def test_a_mapped_weight_is_owned_before_it_is_zeroed_in_place(tmp_path):
    a = torch.randn(512, 512)
    layer = nn.Linear(512, 512, bias=False)
    layer.weight.data = mapped(tmp_path / "w.safetensors", a=a)["a"]
    models.own_weights([layer])
    assert not memory.file_mapped([layer.weight])[0] and torch.equal(layer.weight, a)
    models.get_weight(layer).masked_fill_(a.abs() < 0.5, 0)
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("a"), a)


def test_weights_in_ordinary_memory_are_written_in_place():
    layer = nn.Linear(8, 4, bias=False)
    before = layer.weight.data
    models.set_weight(layer, torch.zeros(4, 8))
    assert layer.weight.data is before or layer.weight.data_ptr() == before.data_ptr()
    assert (layer.weight == 0).all()


@linux_only
def test_moving_off_the_cpu_lets_go_of_the_checkpoint_pages(tmp_path):
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    w = mapped(tmp_path / "w.safetensors", a=a, b=b)
    warm, layer = nn.Linear(1024, 1024, bias=False), nn.Linear(1024, 1024, bias=False)
    warm.weight.data, layer.weight.data = w["a"], w["b"]
    float(layer.weight.detach().sum() + warm.weight.detach().sum())
    models.move(warm, torch.device("meta"))  # the first call maps code and libraries: not measured
    before = rss_file_kib()
    # on a GPU run the block goes to the device and comes back as new host memory: the file's pages must go
    models.move(layer, torch.device("meta"))
    assert layer.weight.device.type == "meta"
    assert before - rss_file_kib() >= 0.9 * 4096


def test_file_mapped_is_false_for_ordinary_and_partial_tensors():
    t = torch.randn(64, 64)
    assert memory.file_mapped([t, t[1:], torch.empty(0)]) == [False, False, False]


@linux_only
def test_spilled_tensors_read_back_equal_but_are_held_by_their_file(tmp_path):
    t = {"mask": torch.randint(0, 255, (1 << 20,), dtype=torch.uint8), "other": torch.randn(300, 70)}
    before = rss_file_kib()
    back = memory.spill_to_file(t, tmp_path / "spill.safetensors")
    assert rss_file_kib() - before < 64  # 1 MiB written, not resident until read (a header page may be)
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    assert memory.file_mapped(list(back.values())) == [True, True]
    (tmp_path / "spill.safetensors").unlink()  # the mapping outlives the name (POSIX)
    assert torch.equal(back["mask"], t["mask"])
    assert memory.spill_to_file({}, tmp_path / "none.safetensors") == {}
    assert not (tmp_path / "none.safetensors").exists()


CHURN = """
import resource, torch
from core.pruning import memory

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

def faults_of_a_pass():
    # a forward pass's pattern: several activation-sized buffers live at once, then all freed
    r = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bufs = [torch.ones(1 << 20) for _ in range(4)]  # 4 MiB each
    del bufs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r

def steady(n=4):
    for _ in range(6):  # the heap's free chunks settle (aligned requests need a little more than a freed buffer)
        faults_of_a_pass()
    return max(faults_of_a_pass() for _ in range(n))

with memory.reusing_freed_memory():
    with memory.reusing_freed_memory():
        inner = steady()
    outer = steady()  # the inner exit must not end the outer scope
    held = rss_mib()
print(inner, outer, held - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._libc() is None, reason="glibc malloc only")
def test_freed_activation_buffers_are_reused_inside_the_scope_and_handed_back_at_its_end():
    import subprocess

    # a fresh process: the allocator's state is its own
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True).stdout
    inner, outer, handed_back = out.split()
    pages = 4 * (4 << 20) // 4096
    assert int(inner) < pages // 20 and int(outer) < pages // 20  # no fresh pages for a pass's buffers
    assert float(handed_back) > 12  # MiB: the four buffers the heap held
