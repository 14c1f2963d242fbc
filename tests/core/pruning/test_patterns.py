import torch

from core.pruning import patterns
from core.pruning.masks import pack_mask, unpack_mask


def test_lowest_per_row_removes_exactly_int_in_p_per_row():
    s = torch.rand(7, 30)
    m = patterns.lowest_per_row(s, 0.37)
    assert (m.sum(1) == int(30 * 0.37)).all()
    # every removed score is below every kept score of the same row
    for r in range(7):
        assert s[r][m[r]].max() <= s[r][~m[r]].min()


def test_lowest_overall_uses_one_threshold():
    s = torch.rand(8, 16)
    m = patterns.lowest_overall(s, 0.5)
    assert m.sum() == 64
    assert s[m].max() <= s[~m].min()


def test_nm_mask_keeps_the_n_largest_of_each_group():
    for n, mm in [(2, 4), (4, 8), (1, 4), (3, 5)]:
        s = torch.rand(5, 40)
        m = patterns.nm_mask(s, n, mm)
        w = torch.ones_like(s).masked_fill(m, 0)
        assert patterns.satisfies_nm(w, n, mm)
        g = s.reshape(5, -1, mm)
        kept = (~m).reshape(5, -1, mm)
        assert (kept.sum(2) == n).all()
        # the kept entries are the group's top-n
        assert torch.equal(
            torch.sort(g.masked_fill(~kept, -1), 2, descending=True).values[..., :n], torch.topk(g, n, 2).values
        )


def test_nm_mask_tail_group_keeps_at_most_n():
    s = torch.rand(3, 10)  # 2 full groups of 4 and a tail of 2
    m = patterns.nm_mask(s, 1, 4)
    assert (~m[:, 8:]).sum(1).max() <= 1
    assert patterns.satisfies_nm(torch.ones_like(s).masked_fill(m, 0), 1, 4)


def test_satisfies_nm_detects_violation():
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert not patterns.satisfies_nm(w, 2, 4)
    assert patterns.satisfies_nm(w, 3, 4)


def test_masks_pack_to_one_bit_and_round_trip():
    keep = torch.rand(33, 17) > 0.5
    packed = pack_mask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == (33 * 17 + 7) // 8
    assert torch.equal(unpack_mask(packed, keep.shape), keep)


def test_lowest_per_row_removes_exactly_k_and_breaks_ties_like_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (64, 40), generator=g).float()  # many ties
    score[3] = 0  # a row of equal scores
    mask = patterns.lowest_per_row(score, 0.5)
    assert (mask.sum(1) == 20).all()
    order = torch.sort(score, dim=1, stable=True).indices[:, :20]
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, order, True))


def test_lowest_overall_removes_exactly_k_with_one_threshold():
    score = torch.tensor([[0.0, 1.0, 1.0, 1.0], [2.0, 1.0, 3.0, 0.5]])
    mask = patterns.lowest_overall(score, 0.5)
    assert mask.sum() == 4
    assert torch.equal(mask, torch.tensor([[True, True, True, False], [False, False, False, True]]))


def test_nm_mask_breaks_ties_like_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    for n, m in [(2, 4), (4, 8), (3, 5), (2, 16)]:
        score = torch.randint(0, 3, (32, 4 * m), generator=g).float()  # many ties
        mask = patterns.nm_mask(score, n, m)
        groups = score.reshape(32, -1, m)
        order = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
        expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(32, -1)
        assert torch.equal(mask, expected), (n, m)


def test_kth_smallest_equals_torch_kthvalue():
    g = torch.Generator().manual_seed(0)
    for score in (torch.rand(9, 31, generator=g), torch.randint(0, 5, (9, 31), generator=g).float()):
        for k in (1, 7, 31):
            assert torch.equal(patterns.kth_smallest(score, k), score.kthvalue(k, dim=1, keepdim=True).values)


def test_sorting_network_sorts_every_input_of_up_to_ten_values():
    import itertools

    for n in range(1, 11):  # zero-one principle: a network that sorts every 0/1 input sorts everything
        net = patterns._sorting_network(n)
        for bits in itertools.product([0, 1], repeat=n):
            v = list(bits)
            for i, j in net:
                v[i], v[j] = min(v[i], v[j]), max(v[i], v[j])
            assert v == sorted(v), (n, bits)


def test_kth_smallest_of_columns_equals_kthvalue_for_short_and_long_groups():
    g = torch.Generator().manual_seed(0)
    for m in (2, 3, 4, 5, 8, 12):
        x = torch.randint(0, 5, (m, 300), generator=g).float()  # many ties
        for k in range(1, m + 1):
            got = patterns.kth_smallest_of_columns(x, k)
            assert torch.equal(got, x.kthvalue(k, dim=0, keepdim=True).values), (m, k)
