import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from four_m.tokenize.quantizer import VectorQuantizer


def quantizer(**overrides) -> VectorQuantizer:
    settings = {"codebook_size": 8, "code_dim": 4, "commitment": 0.25, "ema_decay": 0.5, "dead_after": 3}
    return VectorQuantizer(**(settings | overrides))


def as_map(vectors: torch.Tensor, side: int) -> torch.Tensor:
    """(side*side, D) -> (1, D, side, side), row-major."""
    return vectors.T.reshape(1, -1, side, side)


def test_codes_are_the_nearest_by_cosine_with_a_straight_through_gradient():
    torch.manual_seed(0)
    vq = quantizer().eval()
    ids = torch.randint(8, (2, 3, 3))
    lengths = torch.rand(2, 3, 3, 1) * 5 + 0.1  # any length: only the direction counts
    encodings = (vq.codebook[ids] * lengths).permute(0, 3, 1, 2).requires_grad_()  # (2, 4, 3, 3)
    out = vq(encodings)
    assert torch.equal(out.ids, ids)
    torch.testing.assert_close(out.codes, vq.codebook[ids].permute(0, 3, 1, 2))
    assert out.loss.item() < 1e-10  # encodings sit on their codes
    out.codes.sum().backward()
    assert encodings.grad is not None and encodings.grad.abs().sum() > 0


def test_eval_mode_leaves_the_state_alone():
    vq = quantizer(dead_after=1).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 4, 5, 5))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_a_used_code_moves_by_ema_towards_its_encodings_and_stays_unit_length():
    torch.manual_seed(0)
    vq = quantizer(ema_decay=0.75, dead_after=100).train()
    target = F.normalize(vq.codebook[3] + 0.3 * torch.randn(4), dim=0)
    others = vq.codebook[torch.arange(8) != 3].clone()
    expected = F.normalize(torch.lerp(vq.codebook[3], target, 0.25), dim=0)  # a step of 1 - ema_decay
    assert vq(as_map(target.expand(4, 4), 2)).ids.eq(3).all()
    torch.testing.assert_close(vq.codebook[3], expected)
    for _ in range(30):
        vq(as_map(target.expand(4, 4), 2))
    assert torch.dot(vq.codebook[3], target) > 0.9999
    torch.testing.assert_close(vq.codebook.norm(dim=1), torch.ones(8))
    torch.testing.assert_close(vq.codebook[torch.arange(8) != 3], others)  # unused, not yet dead


def test_dead_codes_are_restarted_on_encodings_and_usage_rises():
    """Every encoding starts nearest to code 0; only restarts can bring the other codes into use."""
    torch.manual_seed(0)
    centre = F.normalize(torch.ones(4), dim=0)
    clusters = F.normalize(centre + 0.6 * F.normalize(torch.randn(8, 4), dim=1), dim=1)  # (8, 4)

    def batch() -> torch.Tensor:
        picks = clusters[torch.randint(8, (64,))] + 0.01 * torch.randn(64, 4)
        return as_map(picks, 8)  # (1, 4, 8, 8)

    def usage_after(dead_after: int) -> tuple[float, float]:
        vq = quantizer(ema_decay=0.9, dead_after=dead_after).train()
        vq.codebook.copy_(-centre.expand(8, 4))
        vq.codebook[0] = centre
        first = vq(batch()).usage.item()
        for _ in range(40):
            last = vq(batch())
        return first, last.usage.item()

    assert usage_after(dead_after=10**6) == (1 / 8, 1 / 8)  # collapsed for good without restarts
    first, last = usage_after(dead_after=2)
    assert first == 1 / 8 and last >= 5 / 8


def test_usage_and_perplexity_of_a_batch():
    vq = quantizer(code_dim=8).eval()
    vq.codebook.copy_(torch.eye(8))
    uniform = vq(as_map(torch.eye(8).repeat(2, 1), 4))  # every code twice
    assert uniform.usage.item() == 1.0
    torch.testing.assert_close(uniform.perplexity, torch.tensor(8.0))
    single = vq(as_map(torch.eye(8)[[5] * 16], 4))
    assert single.usage.item() == 1 / 8
    torch.testing.assert_close(single.perplexity, torch.tensor(1.0))


def test_all_state_is_in_buffers_that_round_trip_through_safetensors(tmp_path):
    vq = quantizer(dead_after=2).train()
    for _ in range(3):
        vq(torch.randn(2, 4, 3, 3))
    assert set(vq.state_dict()) == {"codebook", "idle"} and not list(vq.parameters())
    save_file(vq.state_dict(), tmp_path / "vq.safetensors")
    fresh = quantizer()
    fresh.load_state_dict(load_file(tmp_path / "vq.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(vq.state_dict().values(), fresh.state_dict().values(), strict=True))
