"""The route-only model: blocks 0..router_layer and the router of a gatedlora save, routing as the full model."""
import pytest
import torch

from gatedlora import GatedLoraConfig, get_router, patch_model, save_pretrained
from gatedlora.route_only import RouteOnlyModel, cut_config
from tiny_models import padded_batch, tiny_causal_lm


BATCH = padded_batch([9, 3, 12, 7, 1, 12], 12, seed=5)


def saved_model_and_router(tmp_path, arch="llama", layers=4, router_layer=1, router=None, seed=0):
    """A tiny causal LM saved with save_pretrained, patched with sequence gates and a random router
    (saved with gatedlora.save_pretrained) that sends about half of BATCH to the adapter.
    Returns (model dir, router dir, the full patched model)."""
    model = tiny_causal_lm(arch, layers=layers, seed=seed)
    model.save_pretrained(tmp_path / "model")
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=router_layer, router=router,
                                       target_modules=["q_proj", "v_proj", "down_proj"], r=4))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("gate_router.") or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model(input_ids=BATCH[0], attention_mask=BATCH[1])
        last = [m for m in get_router(model).router.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias[-1] -= torch.logit(get_router(model).last_probabilities.double()).median().float()
    save_pretrained(model, tmp_path / "router")
    return tmp_path / "model", tmp_path / "router", model


@pytest.mark.parametrize("arch,router_layer,side", [("llama", 1, "left"), ("qwen2", 0, "right"), ("llama", 2, "left")])
def test_probabilities_are_the_full_models_bitwise(tmp_path, arch, router_layer, side):
    model_dir, router_dir, full = saved_model_and_router(tmp_path, arch, router_layer=router_layer)
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir)
    ids, mask = BATCH if side == "left" else padded_batch([9, 3, 12, 7, 1, 12], 12, side=side, seed=5)
    with torch.no_grad():
        full(input_ids=ids, attention_mask=mask)
        got = route_only(ids, mask)
    want = get_router(full).last_probabilities
    assert torch.equal(got, want)
    decisions = get_router(full).last_decisions
    assert 0 < int(decisions.sum()) < len(decisions)  # both routes taken: the comparison means something
    assert route_only.routes(got) == ["adapter" if d else "base" for d in decisions.tolist()]


def test_only_the_routing_blocks_are_loaded(tmp_path):
    model_dir, router_dir, full = saved_model_and_router(tmp_path, layers=4, router_layer=1)
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir)
    names = {n for n, _ in route_only.backbone.named_parameters()}
    assert any(n.startswith("layers.1.") for n in names) and not any(n.startswith("layers.2.") for n in names)
    assert not any("lm_head" in n for n in names)
    full_weights = dict(full.model.named_parameters())
    for name, param in route_only.backbone.named_parameters():  # the checkpoint's values, not fresh ones
        assert torch.equal(param, full_weights[name]), name


def test_concurrent_forwards_each_read_their_own_block_output(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    model_dir, router_dir, _ = saved_model_and_router(tmp_path, layers=3, router_layer=0)
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir)
    batches = [padded_batch([n, 2, 5], 8, seed=n) for n in range(1, 9)]
    with torch.no_grad():
        alone = [route_only(ids, mask) for ids, mask in batches]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: route_only(*b), batches * 3))
    for i, got in enumerate(together):
        assert torch.equal(got, alone[i % len(batches)])


def test_two_class_and_custom_routers(tmp_path):
    from gatedlora.routing import prism_two_class_router

    model_dir, router_dir, full = saved_model_and_router(tmp_path, layers=3, router_layer=0,
                                                         router=prism_two_class_router(40, width=24).eval())
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir)
    ids, mask = padded_batch([4, 6, 2], 6, seed=9)
    with torch.no_grad():
        full(input_ids=ids, attention_mask=mask)
        assert torch.equal(route_only(ids, mask), get_router(full).last_probabilities)

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(40, 1)

        def forward(self, h):
            return torch.sigmoid(self.proj(h)).squeeze(-1)

    other = tmp_path / "custom"
    other.mkdir()
    model_dir, router_dir, full = saved_model_and_router(other, layers=3, router_layer=0, router=Custom())
    with pytest.raises(ValueError, match=r"custom router \(Custom\); pass router="):
        RouteOnlyModel.from_pretrained(model_dir, router_dir)
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir, router=Custom())
    with torch.no_grad():
        full(input_ids=ids, attention_mask=mask)
        assert torch.equal(route_only(ids, mask), get_router(full).last_probabilities)


def test_errors_name_the_problem(tmp_path):
    model_dir, router_dir, _ = saved_model_and_router(tmp_path, layers=3, router_layer=0)
    token_dir = tmp_path / "token"
    save_pretrained(patch_model(tiny_causal_lm(layers=3), GatedLoraConfig(target_modules=["q_proj"])), token_dir)
    with pytest.raises(ValueError, match="holds gate='token' gates; a route-only model needs a router"):
        RouteOnlyModel.from_pretrained(model_dir, token_dir)
    with pytest.raises(FileNotFoundError, match="not a gatedlora save directory"):
        RouteOnlyModel.from_pretrained(model_dir, tmp_path / "nowhere")
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="router_layer=2 leaves no block for the adapter: the model has 3 blocks"):
        cut_config(AutoConfig.from_pretrained(model_dir), 3)
