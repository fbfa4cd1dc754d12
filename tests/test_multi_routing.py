"""Several adapters, one router: on tiny Llama and Qwen2 models with three PEFT adapters (different ranks, each
absent on some projections), each sequence of a batch takes its own route in one pass and through generate();
a sequence on the base model is bitwise the base model, one on adapter i matches PEFT with adapter i active."""
import copy
import pickle
import re
import threading

import pytest
import torch
from concurrent_runs import run_in_threads
from test_decode_graph_safety import cache_argument
from steered_routers import RoutePatternRouter, route_splitting_router
from tiny_models import MULTI_ADAPTERS, padded_batch, tiny_multi_adapter_model

import gatedlora
from gatedlora import GatedLoraConfig, force_gate, get_router, patch_model, unpatch_model
from gatedlora.routed_layer import RoutedLoRALinear
from gatedlora.routing import PrismMultiRouter

LAYERS, ROUTER_LAYER = 4, 1
ADAPTERS = list(MULTI_ADAPTERS)  # route i is ADAPTERS[i - 1]
NAMES = ["base"] + ADAPTERS


def peft_model(arch="llama"):
    return tiny_multi_adapter_model(arch, layers=LAYERS, layers_to_transform=list(range(ROUTER_LAYER + 1, LAYERS)))


def peft_logits(model, ids, mask, **kwargs):
    """Each route's logits from the unpatched PEFT model: the base model and each adapter active alone."""
    out = {}
    with torch.no_grad():
        with model.disable_adapter():
            out["base"] = model(input_ids=ids, attention_mask=mask, **kwargs).logits
        for name in ADAPTERS:
            model.set_adapter(name)
            out[name] = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    model.set_adapter(ADAPTERS[0])
    return out


def routed_model(arch="llama", side="left", backend="auto"):
    """A patched model whose router (linear, on the hidden states) sends the batch's sequences to every route;
    returns it, the batch, the routes and each route's PEFT logits."""
    model = peft_model(arch)
    ids, mask = padded_batch([7, 4, 9, 5, 8, 6], 9, side=side, seed=5)
    routes = [2, 0, 3, 1, 0, 3]
    expected = peft_logits(model, ids, mask)
    router = route_splitting_router(model, [(ids, mask, routes)], ROUTER_LAYER, len(NAMES))
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS, router=router,
                                       backend=backend))
    return model, (ids, mask), torch.tensor(routes), expected


def check_routes(logits, routes, expected, atol=1e-5):
    for row, route in enumerate(routes.tolist()):
        want = expected[NAMES[route]][row]
        if route == 0:
            assert torch.equal(logits[row], want), f"sequence {row} on the base model differs from it"
        else:
            err = (logits[row] - want).abs().max().item()
            assert err <= atol, (row, NAMES[route], err)
    # and the routes matter: every adapter changes its sequences' logits
    for name in ADAPTERS:
        assert (expected[name] - expected["base"]).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_sequence_takes_its_route_in_one_pass(arch, side):
    model, (ids, mask), routes, expected = routed_model(arch, side)
    layers = [m for m in model.modules() if isinstance(m, RoutedLoRALinear)]
    assert len(layers) == 7 * (LAYERS - ROUTER_LAYER - 1)
    assert any(len(m.adapter_names) < len(ADAPTERS) for m in layers)  # some adapter is absent somewhere
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    check_routes(logits, routes, expected)
    router = get_router(model)
    assert router.last_routes.dtype == torch.long and torch.equal(router.last_routes, routes)
    assert torch.equal(router.last_decisions, routes != 0)
    assert router.last_probabilities.shape == (6, 4)
    torch.testing.assert_close(router.last_probabilities.sum(-1), torch.ones(6))


def test_mixed_routes_match_peft_mixed_batch():
    """PEFT's own answer for several adapters in one batch (``adapter_names``), against gatedlora's one pass."""
    model, (ids, mask), routes, _ = routed_model()
    names = ["__base__" if r == 0 else ADAPTERS[r - 1] for r in routes.tolist()]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        unpatch_model(model)
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    torch.testing.assert_close(logits, mixed, rtol=0, atol=1e-5)


def test_a_parametrized_lora_weight_is_read_through_its_parametrization():
    """torch.nn.utils.parametrize moves a weight out of the module's parameters (PEFT runs such a LoRA as usual): the
    routed layers raised a bare KeyError. They now read the weight the parametrization computes, per route as PEFT."""
    from torch.nn.utils import parametrize

    class Halved(torch.nn.Module):
        def forward(self, weight):
            return weight * 0.5

    model, (ids, mask), routes, _ = routed_model()
    router = get_router(model).router
    unpatch_model(model)
    for name, module in model.named_modules():
        if name.endswith("lora_B.code"):
            parametrize.register_parametrization(module, "weight", Halved())
    expected = peft_logits(model, ids, mask)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS,
                                       router=router))
    with torch.no_grad():
        check_routes(model(input_ids=ids, attention_mask=mask).logits, routes, expected)


def test_a_layer_holding_only_an_unrouted_inactive_adapter_is_left_to_peft():
    """An adapter that is not routed, with LoRA on embed_tokens (a layer kind gatedlora does not patch): the whole
    model was refused, though PEFT runs that layer as its base layer. It is left to PEFT; the routes are PEFT's
    adapters as before. Where the unrouted adapter is active there, PEFT would run it on every sequence: refused,
    saying so."""
    from peft import LoraConfig

    model = peft_model()
    model.add_adapter("extra", LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False))
    model.set_adapter("extra")
    config = GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS)
    with pytest.raises(TypeError, match=r"embed_tokens .*holds none of the routed adapters, but PEFT would run its "
                                        r"active adapter \['extra'\] there on every sequence"):
        patch_model(model, config)
    ids, mask = padded_batch([7, 4, 9, 5, 8, 6], 9, side="left", seed=5)
    routes = [2, 0, 3, 1, 0, 3]
    expected = peft_logits(model, ids, mask)
    embedding = model.base_model.model.model.embed_tokens
    router = route_splitting_router(model, [(ids, mask, routes)], ROUTER_LAYER, len(NAMES))
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS, router=router))
    assert model.base_model.model.model.embed_tokens is embedding
    with torch.no_grad():
        check_routes(model(input_ids=ids, attention_mask=mask).logits, torch.tensor(routes), expected)


def test_one_route_for_every_sequence_runs_plain_lora_or_the_base_layer(monkeypatch):
    """The host sees (on the CPU) when every sequence takes one route: that adapter's plain LoRA, or the base
    layer alone, no multi-adapter op."""
    model = peft_model()
    ids, mask = padded_batch([5, 7, 3], 7)
    expected = peft_logits(model, ids, mask)
    router = RoutePatternRouter(40, len(NAMES))
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS, router=router))
    calls = []
    monkeypatch.setattr("gatedlora.routed_layer.gated_lora_multi", lambda *a, **k: calls.append(1))
    for route in range(len(NAMES)):
        router.pattern = torch.full((3,), route)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        check_routes(logits, router.pattern, expected)
    assert not calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_routes_hold_through_generate(arch):
    """Greedy generate: each sequence's tokens and scores are those of PEFT generating with its route alone;
    the decision rides on the KV cache (routes_of) and holds for every decode step."""
    model, (ids, mask), routes, _ = routed_model(arch)
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                   return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(get_router(model).routes_of(out).routes, routes)
    assert torch.equal(get_router(model).last_routes, routes)
    scores = torch.stack(out.scores, 1)
    unpatch_model(model)
    for route, name in enumerate(NAMES):
        rows = (routes == route).nonzero().flatten()
        with torch.no_grad():
            if name == "base":
                with model.disable_adapter():
                    want = model.generate(input_ids=ids[rows], attention_mask=mask[rows], **options)
            else:
                model.set_adapter(name)
                want = model.generate(input_ids=ids[rows], attention_mask=mask[rows], **options)
        assert torch.equal(out.sequences[rows], want.sequences), name
        torch.testing.assert_close(scores[rows], torch.stack(want.scores, 1), rtol=0, atol=1e-4)


def test_triton_backend_matches_torch_at_model_level():
    """The interpreter's Triton kernel (compiled with a GPU) in every routed layer: the same routes and logits."""
    if "triton" not in gatedlora.available_backends():
        pytest.skip("triton is not installed")
    model, (ids, mask), routes, expected = routed_model(backend="triton")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    check_routes(logits, routes, expected)


def test_default_router_starts_on_the_first_adapter():
    model = peft_model()
    ids, mask = padded_batch([5, 7], 7)
    expected = peft_logits(model, ids, mask)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS))
    router = get_router(model)
    assert isinstance(router.router, PrismMultiRouter) and router.adapters == ADAPTERS
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(router.last_routes, torch.tensor([1, 1]))
    assert router.last_probabilities[:, 1].min() > 0.99
    torch.testing.assert_close(logits, expected[ADAPTERS[0]], rtol=0, atol=1e-5)


def test_force_gate_zero_is_the_base_model_and_soft_values_are_refused():
    model, (ids, mask), routes, expected = routed_model()
    with torch.no_grad(), force_gate(model, 0.0):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected["base"])
    with torch.no_grad(), force_gate(model, 1.0):
        check_routes(model(input_ids=ids, attention_mask=mask).logits, routes, expected)
    with pytest.raises(ValueError, match=r"routes are hard: value must be 0.0 .* or 1.0"):
        with force_gate(model, 0.5):
            pass
    with torch.no_grad(), model.disable_adapter():  # PEFT's switch, kept working
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected["base"])


def test_last_routes_are_per_thread():
    model, (ids, mask), routes, _ = routed_model()
    seen = {}

    def other():
        with torch.no_grad():
            model(input_ids=ids[:2], attention_mask=mask[:2])
        seen["other"] = get_router(model).last_routes

    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert torch.equal(seen["other"], routes[:2])
    assert torch.equal(get_router(model).last_routes, routes)  # this thread's own, not the other's


def test_patch_and_unpatch_round_trip():
    model = peft_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    q = model.base_model.model.model.layers[2].self_attn.q_proj
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS))
    layer = model.base_model.model.model.layers[2].self_attn.q_proj
    assert isinstance(layer, RoutedLoRALinear) and layer.lora_A is q.lora_A  # shared, not copied
    assert layer.route_slots == (-1, 0, 1, 2)
    k = model.base_model.model.model.layers[2].self_attn.k_proj
    assert k.adapter_names == ("math", "chat") and k.route_slots == (-1, 0, -1, 1)  # code absent: base here
    assert set(before) <= set(model.state_dict())
    unpatch_model(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_set_adapter_on_a_routed_model_says_what_to_do_instead():
    """The one-adapter refusal told a routed model's user to patch with adapters=[...], which they had done."""
    model, (ids, mask), routes, expected = routed_model()
    with pytest.raises(RuntimeError, match=re.escape(f"its router chooses among {ADAPTERS!r} per sequence") + r".*"
                                           r"model\.set_requires_grad\(\[\.\.\.\]\).*unpatch_model"):
        model.set_adapter(ADAPTERS[1])
    with torch.no_grad():
        check_routes(model(input_ids=ids, attention_mask=mask).logits, routes, expected)


def test_training_updates_the_weights_the_kernels_read():
    """Gradients reach each adapter from its own sequences only; after an optimizer step the patched model
    computes with the new weights (no stale copy), still matching PEFT."""
    model, (ids, mask), _, _ = routed_model()
    routes = torch.tensor([2, 0, 2, 1, 0, 1])  # no sequence on chat
    get_router(model).router = RoutePatternRouter(40, len(NAMES))
    get_router(model).router.pattern = routes
    for name, param in model.named_parameters():  # PEFT trains only its active adapter: make each trainable
        param.requires_grad_("lora_" in name)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    params = dict(model.named_parameters())
    grads = {name: sum(p.grad.abs().sum() for n, p in params.items() if f".{name}." in n and p.grad is not None)
             for name in ADAPTERS}
    assert grads["math"] > 0 and grads["code"] > 0 and grads["chat"] == 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        unpatch_model(model)
        expected = peft_logits(model, ids, mask)
    check_routes(logits, routes, expected)


@pytest.mark.parametrize("tokens", (9, 4))  # 54 rows a projection: the grouped strategy; 24: concatenated
def test_bf16_autocast_logits_and_gradients_are_as_good_as_pefts(tokens):
    """Under bf16 autocast on the CPU (base layers in bf16, PEFT's fp32 adapters) a mixed batch runs forward and
    backward: each sequence's logits and each adapter's gradients are within 2x of PEFT's own bf16 error (that
    adapter active on that adapter's sequences) plus one bf16 unit of the largest value, both against PEFT in
    fp32; base sequences are bitwise the base model under the same autocast."""
    model, (ids, mask), _, _ = routed_model()
    ids, mask = ids[:, -tokens:], mask[:, -tokens:]  # left padded: the last tokens, every route kept
    routes = torch.tensor([2, 0, 3, 1, 0, 3])
    get_router(model).router = RoutePatternRouter(40, len(NAMES))
    get_router(model).router.pattern = routes
    reference = peft_model()
    loss_weights = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(11))

    def loss_of(logits, rows):  # a sum over sequences, so each route's sequences can be run alone
        return (logits.float() * loss_weights[rows]).sum()

    def lora_parameters(m, name):
        return {n: p.requires_grad_() for n, p in m.named_parameters()
                if f"lora_A.{name}." in n or f"lora_B.{name}." in n}

    def peft_run(name, autocast):
        rows = routes == NAMES.index(name)
        reference.set_adapter(name)
        params = lora_parameters(reference, name)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = reference(input_ids=ids[rows], attention_mask=mask[rows]).logits
        grads = torch.autograd.grad(loss_of(logits, rows), list(params.values()))
        return logits.detach().float(), dict(zip(params, grads))

    params = {name: lora_parameters(model, name) for name in ADAPTERS}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
        with torch.no_grad(), force_gate(model, 0.0):
            base = model(input_ids=ids, attention_mask=mask).logits
    every = [p for named in params.values() for p in named.values()]
    grads = dict(zip(every, torch.autograd.grad(loss_of(logits, slice(None)), every)))
    on_base = routes == 0
    assert torch.equal(logits[on_base].detach(), base[on_base])
    for name in ADAPTERS:
        rows = routes == NAMES.index(name)
        (exact_logits, exact), (peft_logits_, peft) = peft_run(name, False), peft_run(name, True)
        check_bf16_error(name, logits[rows].detach().float(), peft_logits_, exact_logits)
        assert exact.keys() == params[name].keys()
        for n, p in params[name].items():
            assert grads[p].dtype == torch.float32
            check_bf16_error(n, grads[p], peft[n], exact[n])


def check_bf16_error(name, ours, peft, exact):
    ours_err, peft_err = (ours - exact).abs().max(), (peft - exact).abs().max()
    floor = torch.finfo(torch.bfloat16).eps * exact.abs().max()
    assert ours_err <= 2 * peft_err + floor, (name, float(ours_err), float(peft_err), float(floor))


@pytest.mark.parametrize("routes", ([0, 0, 0, 0, 0, 0], [2, 2, 2, 2, 2, 2]), ids=("all base", "all on code"))
def test_training_a_batch_on_one_route_gives_every_adapter_a_gradient(routes):
    """A batch whose sequences all take one route still gives every trainable adapter weight of a routed layer
    a gradient, zero where no sequence took it (DDP without find_unused_parameters needs one on every rank)."""
    model, (ids, mask), _, _ = routed_model()
    get_router(model).router = RoutePatternRouter(40, len(NAMES))
    get_router(model).router.pattern = torch.tensor(routes)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert all(p.grad is not None for p in lora.values()), [n for n, p in lora.items() if p.grad is None]
    for name in ADAPTERS:
        total = sum(p.grad.abs().sum().item() for n, p in lora.items() if f".{name}." in n)
        assert (total > 0) == (routes[0] != 0 and ADAPTERS[routes[0] - 1] == name), (name, total)


def test_configuration_errors_are_named():
    from tiny_models import tiny_causal_lm

    with pytest.raises(ValueError, match="adapters needs gate='sequence'"):
        GatedLoraConfig(gate="token", adapters=ADAPTERS)
    with pytest.raises(ValueError, match="routes among several adapters are hard"):
        GatedLoraConfig(gate="sequence", adapters=ADAPTERS, hard=False)
    # the argmax decides: a threshold was accepted and silently ignored, and cuda refused at the first mixed forward
    with pytest.raises(ValueError, match=r"routes among several adapters are hard \(argmax\), so threshold=0.9 does "
                                         r"not apply"):
        GatedLoraConfig(gate="sequence", adapters=ADAPTERS, threshold=0.9)
    with pytest.raises(ValueError, match=r"backend='cuda' has no kernel for several adapters"):
        GatedLoraConfig(gate="sequence", adapters=ADAPTERS, backend="cuda")
    with pytest.raises(ValueError, match="non-empty list of distinct adapter names"):
        GatedLoraConfig(gate="sequence", adapters=["math", "math"])
    with pytest.raises(ValueError, match="adapters names PEFT adapters"):
        patch_model(tiny_causal_lm(), GatedLoraConfig(gate="sequence", adapters=ADAPTERS, target_modules=["q_proj"]))
    missing = r"\['poetry'\] not found in the LoRA layers .* hold \['chat', 'code', 'math'\]"
    with pytest.raises(ValueError, match=missing):
        patch_model(peft_model(), GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER,
                                                  adapters=["math", "poetry"]))
    with pytest.raises(ValueError, match=r"routes every PEFT LoRA layer .* leaves out \['base_model"):
        patch_model(peft_model(), GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS,
                                                  target_modules=["q_proj"]))
    whole = tiny_multi_adapter_model(layers=3)  # adapters on every block, the router's too
    with pytest.raises(ValueError, match="the router's input must not depend on the adapter"):
        patch_model(whole, GatedLoraConfig(gate="sequence", adapters=ADAPTERS))
    model = peft_model()
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS,
                                       router=torch.nn.Linear(40, 3)))
    ids, mask = padded_batch([3, 4], 4)
    with pytest.raises(ValueError, match=r"router must map hidden states \[B, H\] to logits \[B, 4\] = \[2, 4\]"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"get_router\(model\).threshold: routes among several adapters are hard "
                                         r"\(argmax\), so a threshold \(0.7\) does not apply"):
        get_router(model).threshold = 0.7
    assert get_router(model).threshold == 0.5


def test_a_nan_logit_routes_the_sequence_to_the_base_model():
    model = peft_model()
    ids, mask = padded_batch([5, 6], 6)
    expected = peft_logits(model, ids, mask)

    class NanRouter(torch.nn.Module):
        def forward(self, h):
            logits = torch.zeros(h.shape[0], len(NAMES))
            logits[:, 2] = 3.0
            logits[0, 3] = float("nan")
            return logits

    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS,
                                       router=NanRouter()))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(get_router(model).last_routes, torch.tensor([0, 2]))
    check_routes(logits, torch.tensor([0, 2]), expected)


def test_threads_generating_with_different_mixed_routes_each_match_their_run_alone():
    """Two threads generate at once on one patched model, each batch with its own mix of routes: every decode
    step takes the layers' mixed-batch path (on the CPU its column mask is kept per decision index, beside the
    adapters' concatenated weights that both threads share); each thread's tokens and scores equal its run alone."""
    model = peft_model()
    batches = {"a": padded_batch([7, 4, 9, 5], 9, side="left", seed=11),
               "b": padded_batch([6, 8, 3], 9, side="left", seed=12)}
    routes = {"a": [2, 0, 3, 1], "b": [1, 3, 3]}
    router = route_splitting_router(model, [(*batches[n], routes[n]) for n in batches], ROUTER_LAYER, len(NAMES))
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS, router=router))
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                   return_dict_in_generate=True)

    def generate(name):
        ids, mask = batches[name]
        out = model.generate(input_ids=ids, attention_mask=mask, **options)
        return out.sequences, torch.stack(out.scores, 1), get_router(model).last_routes

    with torch.no_grad():
        solo = {name: generate(name) for name in batches}
    results = run_in_threads(generate, list(batches), repeats=3)
    for name in batches:
        assert torch.equal(solo[name][2], torch.tensor(routes[name]))
        for sequences, scores, last in results[name]:
            assert torch.equal(sequences, solo[name][0]) and torch.equal(last, solo[name][2])
            assert torch.equal(torch.nan_to_num(scores), torch.nan_to_num(solo[name][1]))


def test_compiled_with_fullgraph_routes_as_eager():
    """torch.compile(fullgraph=True) of a model routed among several adapters: one graph (the multi-adapter add is
    the op's graph node, not the CPU path's kept Python state), the prefill's logits as each route's PEFT logits,
    and a decode step on the cache equal to the eager model's."""
    from transformers import DynamicCache

    model, (ids, mask), routes, expected = routed_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    step = torch.tensor([[11], [12], [13], [14], [15], [16]])
    step_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    logits = {}
    with torch.no_grad():
        for name, run in (("compiled", compiled), ("eager", model)):
            cache = DynamicCache(config=model.get_base_model().config)
            prefill = run(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            assert torch.equal(get_router(model).last_routes, routes)
            logits[name] = (prefill, run(input_ids=step, attention_mask=step_mask, past_key_values=cache).logits)
    check_routes(logits["compiled"][0], routes, expected)
    torch.testing.assert_close(logits["compiled"][1], logits["eager"][1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("adapters", [None, ADAPTERS], ids=["one adapter", "several"])
def test_a_router_that_returns_no_tensor_is_named_in_the_forward_and_in_training(adapters):
    """A Transformers-style module returns a tuple: it failed deep inside with "'tuple' object has no attribute"."""

    class TupleRouter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(40, 1 if adapters is None else len(adapters) + 1)

        def forward(self, hidden):
            return (self.proj(hidden),)

    model = peft_model()
    if adapters is None:
        model.delete_adapter("chat"), model.delete_adapter("code")
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=adapters,
                                       router=TupleRouter()))
    ids, mask = padded_batch([3, 5], 5)
    message = r"the router must return a tensor .* hidden states \[B, H\] = \[\d+, 40\], got tuple"
    with torch.no_grad(), pytest.raises(TypeError, match="gatedlora: " + message):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError, match="train_router: " + message):
        labels = [0, 1] if adapters is None else list(range(len(adapters) + 1))
        gatedlora.train_router(model, [[5, 6, 7], [8, 9], [5, 9], [7, 7, 8]][:len(labels)] * 2, labels * 2,
                               epochs=1, progress=False)


def offload(module: torch.nn.Module, name: str = "weight") -> None:
    """Leave ``module``'s parameter on the meta device, as accelerate's offloading does between its hook's calls."""
    setattr(module, name, torch.nn.Parameter(torch.empty_like(getattr(module, name), device="meta"),
                                             requires_grad=False))


@pytest.mark.parametrize("pattern", [[1, 2, 3], [2, 2, 2]], ids=["mixed routes", "one route"])
def test_offloaded_adapter_weights_are_refused_not_read(pattern):
    """Read directly (not through the modules' offload hooks), meta weights gave garbage on the CPU: torch multiplies
    a CPU tensor by a meta one without an error."""
    model = peft_model()
    router = RoutePatternRouter(40, len(NAMES))
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS, router=router))
    router.pattern = torch.tensor(pattern)
    layer = next(m for m in model.modules() if isinstance(m, RoutedLoRALinear))
    offload(layer.lora_B[ADAPTERS[1]])
    ids, mask = padded_batch([5, 7, 3], 7)
    with torch.no_grad(), pytest.raises(RuntimeError, match="LoRA weights on the meta device .*cpu_offload"):
        model(input_ids=ids, attention_mask=mask)


def test_an_offloaded_router_is_refused_without_a_hook_and_runs_through_accelerates():
    model = peft_model()
    router = PrismMultiRouter(40, len(NAMES))
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS, router=router))
    ids, mask = padded_batch([5, 7, 3], 7)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    kept = {name: p.detach().clone() for name, p in router.named_parameters()}
    for module in router.net:
        if isinstance(module, torch.nn.Linear):
            offload(module), offload(module, "bias")
    with torch.no_grad(), pytest.raises(RuntimeError, match="the router's weights on the meta device"):
        model(input_ids=ids, attention_mask=mask)
    accelerate = pytest.importorskip("accelerate")
    accelerate.cpu_offload(router, execution_device=torch.device("cpu"), state_dict=kept)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)


def test_each_row_takes_its_own_adapters_dropout_in_training():
    """Adapters whose lora_dropout differs were refused in training (one dropout pass served every row). Each row
    now takes its own adapter's: ``a`` without dropout matches PEFT, ``b`` at p = 1 drops its whole term (the base
    model's logits), ``c`` at p = 0.5 drops at random; the base row stays bitwise the base model."""
    model = peft_model()
    ids, mask = padded_batch([7, 4, 9, 5], 9, seed=5)
    expected = peft_logits(model, ids, mask)
    a, b, c = ADAPTERS
    for name, dropout in ((a, torch.nn.Identity()), (b, torch.nn.Dropout(1.0)), (c, torch.nn.Dropout(0.5))):
        for module in model.modules():
            if hasattr(module, "lora_dropout") and name in module.lora_dropout:
                module.lora_dropout[name] = dropout
    router = RoutePatternRouter(model.config.hidden_size, len(NAMES))
    router.pattern = torch.tensor([1, 2, 3, 0])
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS, router=router))
    model.train()
    torch.manual_seed(0)
    model.set_requires_grad([a], requires_grad=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert (logits[0] - expected[a][0]).abs().max() <= 1e-5
    assert (logits[1] - expected["base"][1]).abs().max() <= 1e-5 < (expected[b][1] - expected["base"][1]).abs().max()
    assert (logits[2] - expected[c][2]).abs().max() > 1e-3
    assert torch.equal(logits[3], expected["base"][3])
    logits[0].sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if f".{a}." in n and "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.any() for g in grads)


def decode_step(model, ids, mask):
    """A function running one decode step after the prompt, at the same cache length each time, through ``run``
    (the model's call by default): the layers' mixed-batch decode path on the CPU (6 rows, no autograd)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    inputs = {"input_ids": out.logits[:, -1:].argmax(-1), "attention_mask": torch.cat([mask, mask[:, :1] * 0 + 1], 1),
              "use_cache": True, cache_argument(model): out.past_key_values}

    def step(run=model):
        with torch.no_grad():
            logits = run(**inputs).logits
        inputs[cache_argument(model)].crop(-1)
        return logits
    return step


def kept_calls(layer):
    """The records a routed layer kept of its last decode calls, one per routing decision."""
    return list(layer.__dict__.get("_kept_calls", {}).values())


def through_the_op(monkeypatch):
    """Decode steps through ``add_lora_multi_``, without the layers' kept records and concatenations."""
    monkeypatch.setattr(RoutedLoRALinear, "_add_kept_on_cpu", lambda self, *args: None)
    monkeypatch.setattr(gatedlora.routed_layer, "kept_output", lambda *args: None)


def test_a_decode_step_keeps_each_layers_concatenation_and_adds_what_the_op_adds(monkeypatch):
    """Decode steps on the CPU run through what each layer kept from its last call (the same record step after step:
    a call that does not run through it keeps a new one), and give the op's logits bitwise, base sequences the base
    model's."""
    model, (ids, mask), routes, _ = routed_model()
    step = decode_step(model, ids, mask)
    logits = step()
    layers = [m for m in model.modules() if isinstance(m, RoutedLoRALinear)]
    kept = [kept_calls(m) for m in layers]
    assert all(len(k) == 1 for k in kept)
    assert torch.equal(step(), logits)
    assert all(kept_calls(m) == k for m, k in zip(layers, kept))  # (a record of Python objects: == is identity)
    with monkeypatch.context() as patched:
        through_the_op(patched)
        assert torch.equal(step(), logits)
    with force_gate(model, 0.0):
        base = step()
    on_base = routes == 0
    assert torch.equal(logits[on_base], base[on_base]) and not torch.equal(logits[~on_base], base[~on_base])


def change_b_in_place(layers, name):
    with torch.no_grad():
        for m in layers:
            m.lora_B[name].weight.mul_(-2.0)  # the version counter moves


def change_b_through_data(layers, name):
    for m in layers:
        m.lora_B[name].weight.data = m.lora_B[name].weight.data * -2.0  # new storage, the same version


def change_b_to_a_new_parameter(layers, name):
    for m in layers:
        m.lora_B[name].weight = torch.nn.Parameter(m.lora_B[name].weight.detach() * -2.0)


def change_b_unseen_then_forget_kept_copies(layers, name):
    for m in layers:
        m.lora_B[name].weight.data.mul_(-2.0)  # neither storage nor version moves
    gatedlora.ops.forget_kept_copies()


@pytest.mark.parametrize("change", [change_b_in_place, change_b_through_data, change_b_to_a_new_parameter,
                                    change_b_unseen_then_forget_kept_copies, "functional_call"])
def test_a_decode_step_reads_adapter_weights_changed_since_the_last_one(monkeypatch, change):
    """Between two decode steps one adapter's B changes, each way a kept concatenation must notice (for
    ``torch.func.functional_call``, which writes the modules' parameter dicts directly, only within the call): the
    next step adds the changed weights, as the op reading them afresh does, and only that adapter's sequences move."""
    model, (ids, mask), routes, _ = routed_model()
    step = decode_step(model, ids, mask)
    before = step()
    name = ADAPTERS[1]  # route 2
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear) and name in m.lora_B}
    run = model
    if change == "functional_call":
        changed = {f"{n}.lora_B.{name}.weight": m.lora_B[name].weight.detach() * -2.0 for n, m in layers.items()}

        def run(**inputs):
            return torch.func.functional_call(model, changed, (), inputs, strict=False)
    else:
        change(list(layers.values()), name)
    after = step(run)
    with monkeypatch.context() as patched:
        through_the_op(patched)
        assert torch.equal(step(run), after)
    moved = routes == 2
    assert not torch.equal(after[moved], before[moved])
    assert torch.equal(after[~moved], before[~moved])
    if change == "functional_call":
        assert torch.equal(step(), before)  # the module's own weights again


def replace_the_adapters_b_module(layers, name):
    for m in layers:
        old = m.lora_B[name]
        m.lora_B[name] = torch.nn.Linear(old.in_features, old.out_features, bias=False)
        with torch.no_grad():
            m.lora_B[name].weight.copy_(old.weight * -2.0)


def parametrize_the_adapters_b(layers, name):  # the weight is then computed, not a registered parameter
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return weight * -2.0

    for m in layers:
        parametrize.register_parametrization(m.lora_B[name], "weight", Doubled())


def change_the_layers_scalings(layers, name):
    for m in layers:
        m.scalings = tuple(-2.0 * s if n == name else s for n, s in zip(m.adapter_names, m.scalings))


def swap_two_adapters_names(layers, name):  # the same modules in the same order, under each other's names
    other = ADAPTERS[0]
    for m in layers:
        for registry in (m.lora_A, m.lora_B, m.lora_dropout):
            entries = list(registry.items())
            for key, _ in entries:
                del registry[key]
            for key, module in entries:
                registry[{name: other, other: name}.get(key, key)] = module


def hook_the_base_layers(layers, name):
    for m in layers:
        m.base_layer.register_forward_hook(lambda module, args, output: output * 0.5)


def put_in_a_dropout_in_training(layers, name):
    for m in layers:
        m.lora_dropout[name] = torch.nn.Dropout(0.5)


def put_the_dropout_in_training(layers, name):
    for m in layers:
        m.lora_dropout[name].train()


@pytest.mark.parametrize("change", [replace_the_adapters_b_module, parametrize_the_adapters_b,
                                    change_the_layers_scalings, swap_two_adapters_names, hook_the_base_layers,
                                    put_in_a_dropout_in_training, put_the_dropout_in_training])
def test_a_decode_step_sees_the_layers_modules_and_settings_changed_since_the_last_one(monkeypatch, change):
    """What a layer keeps from its last decode call (``kept_call``) serves the next call only where everything that
    call read is as it was: a replaced adapter module, a parametrized weight, other scalings, a hook on the base
    layer, a dropout put in or switched to training, two adapters' names swapped are each seen. With the same random
    stream the step gives the op path's logits; only that adapter's sequences move (under the base layer's hook,
    every one; with swapped names, both adapters' ones)."""
    model, (ids, mask), routes, _ = routed_model()
    name = ADAPTERS[1]  # route 2
    layers = [m for m in model.modules() if isinstance(m, RoutedLoRALinear) and name in m.lora_B]
    if change is swap_two_adapters_names:
        layers = [m for m in layers if ADAPTERS[0] in m.lora_B]
    if change is put_the_dropout_in_training:
        for m in layers:  # a dropout that is off (in eval) when the layers keep their calls
            m.lora_dropout[name] = torch.nn.Dropout(0.5).eval()
    step = decode_step(model, ids, mask)
    step()
    before = step()
    assert all(kept_calls(m) for m in layers)
    change(layers, name)
    torch.manual_seed(3)
    after = step()
    with monkeypatch.context() as patched:
        through_the_op(patched)
        torch.manual_seed(3)
        assert torch.equal(step(), after)
    moved = {hook_the_base_layers: torch.ones_like(routes, dtype=torch.bool),
             swap_two_adapters_names: (routes == 1) | (routes == 2)}.get(change, routes == 2)
    assert not torch.equal(after[moved], before[moved])
    assert torch.equal(after[~moved], before[~moved])


def test_a_decode_step_checks_every_layers_record_at_once_at_its_first_routed_call(monkeypatch):
    """The first routed layer call of a decode step checks every layer's record for the decision in force
    (``kept_call.checked_records``): each layer's own at the first step after they were kept, then all of them joined,
    in one check a step. Each layer then adds through its record without checking it again; every layer keeps its
    record, and each step gives the op path's logits."""
    model, (ids, mask), routes, _ = routed_model()
    step = decode_step(model, ids, mask)
    with monkeypatch.context() as patched:
        through_the_op(patched)
        expected = step()
    step()
    layers = [m for m in model.modules() if isinstance(m, RoutedLoRALinear)]
    records = [kept_calls(m) for m in layers]
    checks, at_once = [], []
    hold, check_all = gatedlora.kept_call.Dependencies.hold, gatedlora.kept_call.checked_records
    monkeypatch.setattr(gatedlora.kept_call.Dependencies, "hold", lambda self, *layers: checks.append(self)
                        or hold(self, *layers))
    monkeypatch.setattr(gatedlora.kept_call, "checked_records", lambda *args: at_once.append(check_all(*args))
                        or at_once[-1])
    for count in (len(layers), 1, 1):
        checks.clear(), at_once.clear()
        assert torch.equal(step(), expected)
        assert len(checks) == count and len(at_once) == 1
        checked, held = at_once[0]
        assert list(checked.items()) == [(id(m), r[0]) for m, r in zip(layers, records)] and held == tuple(layers)
    assert len(checks[0].bases) == len(layers)
    assert all(kept_calls(m) == r for m, r in zip(layers, records))


@pytest.mark.parametrize("hooks", ["on the layers", "on every module"])
def test_a_pre_hook_that_changes_a_layers_adapter_is_seen_by_the_step_it_runs_in(monkeypatch, hooks):
    """A forward pre-hook that updates one adapter's B in place in each routed layer's call, on those layers or on
    every module (``register_module_forward_pre_hook``), runs after the step's first routed call checked the records:
    such a layer checks its own record in its call, after the hook ran, so the step adds B as the hook left it, as
    the op path does, and only that adapter's sequences move."""
    model, (ids, mask), routes, _ = routed_model()
    step = decode_step(model, ids, mask)
    step()
    before = step()
    name = ADAPTERS[1]  # route 2
    layers = [m for m in model.modules() if isinstance(m, RoutedLoRALinear) and name in m.lora_B]
    weights = [m.lora_B[name].weight for m in layers]
    originals = [w.detach().clone() for w in weights]

    def grow(module, args):
        if module in layers:
            with torch.no_grad():
                module.lora_B[name].weight.mul_(-2.0)

    if hooks == "on the layers":
        handles = [m.register_forward_pre_hook(grow) for m in layers]
    else:
        handles = [torch.nn.modules.module.register_module_forward_pre_hook(grow)]
    try:
        after = step()
        with monkeypatch.context() as patched:
            through_the_op(patched)
            with torch.no_grad():
                for w, original in zip(weights, originals):
                    w.copy_(original)
            assert torch.equal(step(), after)
    finally:
        for handle in handles:
            handle.remove()
    moved = routes == 2
    assert not torch.equal(after[moved], before[moved])
    assert torch.equal(after[~moved], before[~moved])


@pytest.mark.parametrize("window", ["record", "joined step"])
def test_a_write_while_a_record_is_kept_or_joined_is_seen_at_later_steps(monkeypatch, window):
    """A write to an adapter weight from another thread can land after the layer's concatenation was built and before
    its record is kept, or after the records were checked and before they are joined into the decision's step
    (injected here at those points, once). The record keeps the key read before the copy, and the step its records'
    expectations, so later steps see the write and add the weights as they are, as the op path does."""
    model, (ids, mask), routes, _ = routed_model()
    step = decode_step(model, ids, mask)
    if window == "joined step":
        step()  # the records kept: the next step checks them one by one, then joins them
    layer = next(m for m in model.modules() if isinstance(m, RoutedLoRALinear))
    kind = gatedlora.kept_call.KeptLayerCall if window == "record" else gatedlora.kept_call.KeptStep
    build, written = kind.__init__, []

    def write_then_build(self, *args):
        if not written:
            written.append(True)
            with torch.no_grad():
                layer.lora_B[ADAPTERS[0]].weight.mul_(-2.0)  # another thread's write
        build(self, *args)

    with monkeypatch.context() as patched:
        patched.setattr(kind, "__init__", write_then_build)
        step()
    assert written
    later = [step() for _ in range(3)]
    with monkeypatch.context() as patched:
        through_the_op(patched)
        expected = step()
    assert all(torch.equal(logits, expected) for logits in later)


def test_a_model_dropped_after_decode_steps_is_freed_without_the_cycle_collector():
    """The kept records hold their layer weakly, and the router's joined steps hold the layers weakly: after CPU
    decode steps, dropping the model frees its layers and weights by reference counting alone."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        model, (ids, mask), routes, _ = routed_model()
        step = decode_step(model, ids, mask)
        for _ in range(3):
            step()
        layer = next(m for m in model.modules() if isinstance(m, RoutedLoRALinear))
        assert kept_calls(layer) and get_router(model).kept_steps()
        alive = [weakref.ref(m) for m in (layer, layer.base_layer.weight, layer.lora_B[ADAPTERS[0]].weight)]
        del layer, step, model
        assert [ref() is None for ref in alive] == [True] * 3
    finally:
        gc.enable()


def test_a_layer_left_out_of_a_step_for_a_hook_is_joined_again_once_it_is_removed(monkeypatch):
    """A forward hook on one base layer for one decode step keeps that layer's record out of the decision's joined
    step (its full path keeps none while hooked). Once the hook is removed its record holds again, and from the
    second forward after, every record is checked together again, in one check a step."""
    model, (ids, mask), routes, _ = routed_model()
    step = decode_step(model, ids, mask)
    step(), step()
    layers = [m for m in model.modules() if isinstance(m, RoutedLoRALinear)]
    handle = layers[3].base_layer.register_forward_hook(lambda module, args, output: None)
    step()
    handle.remove()
    checks = []
    hold = gatedlora.kept_call.Dependencies.hold
    monkeypatch.setattr(gatedlora.kept_call.Dependencies, "hold", lambda self, *layers:
                        checks.append(len(self.bases)) or hold(self, *layers))
    step(), step()  # the first finds its record holding outside the step; the second joins them all again
    for _ in range(2):
        checks.clear()
        step()
        assert checks == [len(layers)]


def two_generations(monkeypatch):
    """A patched model and two generations of one batch shape with different routes: (model, each generation's
    decode step by name, each one's logits through the op path)."""
    model = peft_model()
    router = RoutePatternRouter(model.get_base_model().config.hidden_size, len(NAMES))
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, adapters=ADAPTERS, router=router))
    ids, mask = padded_batch([7, 4, 9, 5, 8, 6], 9, seed=5)
    steps = {}
    for name, routes in {"a": [2, 0, 3, 1, 0, 3], "b": [1, 3, 0, 2, 2, 0]}.items():
        router.pattern = torch.tensor(routes)
        steps[name] = decode_step(model, ids, mask)
    with monkeypatch.context() as patched:
        through_the_op(patched)
        expected = {name: step() for name, step in steps.items()}
    assert not torch.equal(expected["a"], expected["b"])
    return model, steps, expected


def test_generations_decoding_in_threads_at_once_each_add_their_own_routes(monkeypatch):
    """Two generations of one shape with different routes, each decoding in its own thread at the same time: each
    forward checks the records of its own decision (in its thread's forward state), and every step of each gives
    the op path's logits for its routes."""
    model, steps, expected = two_generations(monkeypatch)
    results = run_in_threads(lambda name: steps[name](), list(steps), repeats=12)
    for name, logits in results.items():
        assert all(torch.equal(each, expected[name]) for each in logits), name


def test_a_decode_step_after_an_adapter_is_removed_from_a_layer_fails_as_without_a_kept_call():
    """An adapter module removed from a layer is not used from what the layer kept: the step raises, as the layer's
    full path does."""
    model, (ids, mask), routes, _ = routed_model()
    step = decode_step(model, ids, mask)
    step()
    layer = next(m for m in model.modules() if isinstance(m, RoutedLoRALinear) and ADAPTERS[1] in m.lora_B)
    assert kept_calls(layer)
    del layer.lora_B[ADAPTERS[1]]
    with pytest.raises(KeyError):
        step()


def test_a_cache_routed_to_several_adapters_copies_and_pickles_after_decode_steps():
    """After decode steps on the CPU (whose layers kept records of the generation's decision) the generation's KV
    cache still deep-copies and pickles, and the copy carries the routes; it continues as the original does."""
    model, (ids, mask), routes, _ = routed_model()
    key = cache_argument(model)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        for token in (11, 12):
            mask = torch.cat([mask, torch.ones(6, 1, dtype=mask.dtype)], 1)
            model(input_ids=torch.full((6, 1), token), attention_mask=mask, use_cache=True, **{key: cache})
    assert all(kept_calls(m) for m in model.modules() if isinstance(m, RoutedLoRALinear))
    router = get_router(model)
    copies = [copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))]
    mask = torch.cat([mask, torch.ones(6, 1, dtype=mask.dtype)], 1)
    step = {"input_ids": torch.full((6, 1), 13), "attention_mask": mask, "use_cache": True}
    with torch.no_grad():
        expected = model(**step, **{key: cache}).logits
        for copied in copies:
            assert torch.equal(router.routes_of(copied).routes, routes)
            assert torch.equal(model(**step, **{key: copied}).logits, expected)


def test_interleaved_generations_of_one_shape_each_decode_with_their_own_routes(monkeypatch):
    """Two generations of the same batch shape with different routes, their decode steps interleaved in one thread:
    a layer's record of the other generation's last call is not used (each is found by the decision in force), and
    each step gives the op path's logits for its own routes."""
    model, steps, expected = two_generations(monkeypatch)
    for name in ["a", "b", "a", "a", "b", "b", "a"]:
        assert torch.equal(steps[name](), expected[name]), name
    # each generation keeps its own record: taking turns, neither rebuilds the other's
    layers = [m for m in model.modules() if isinstance(m, RoutedLoRALinear)]
    records = [kept_calls(m) for m in layers]
    assert all(len(r) == 2 for r in records)
    for name in ["b", "a", "b"]:
        steps[name]()
    assert all(kept_calls(m) == r for m, r in zip(layers, records))


def test_a_layers_kept_calls_are_dropped_by_to_by_copies_and_where_they_stop_serving():
    """The records a layer keeps for decode are derived from its weights and keyed by their addresses: ``model.to`` (a
    storage can come back at the same address with new values and its old version), a deep copy and a pickle drop
    them (and ``model.to`` the router's steps joining them), and the next CPU decode step builds a new one. A
    generation's record is dropped by a call of that generation it does not serve (36 rows here), and another
    generation's prompt (54 rows) keeps none."""
    model, (ids, mask), routes, _ = routed_model()
    step = decode_step(model, ids, mask)
    logits = step()
    layer = next(m for m in model.modules() if isinstance(m, RoutedLoRALinear))
    assert len(kept_calls(layer)) == 1
    copied = copy.deepcopy(layer)
    assert not kept_calls(copied) and kept_calls(layer)
    assert not kept_calls(pickle.loads(pickle.dumps(layer)))
    assert torch.equal(step(), logits)  # (the first step kept the records; this one joined them)
    assert get_router(model).kept_steps()
    model.to(torch.float64).to(torch.float32)  # weights back in fp32, at new (or reused) addresses
    assert all(not kept_calls(m) for m in model.modules() if isinstance(m, RoutedLoRALinear))
    assert not get_router(model).kept_steps()
    assert torch.equal(step(), logits)
    first = kept_calls(layer)
    assert len(first) == 1
    key = cache_argument(model)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values  # another generation
        assert kept_calls(layer) == first
        grown = torch.cat([mask, torch.ones(6, 1, dtype=mask.dtype)], 1)
        model(input_ids=torch.full((6, 1), 11), attention_mask=grown, use_cache=True, **{key: cache})
        assert len(kept_calls(layer)) == 2
        grown = torch.cat([grown, torch.ones(6, 6, dtype=mask.dtype)], 1)
        model(input_ids=torch.full((6, 6), 12), attention_mask=grown, use_cache=True, **{key: cache})
    assert kept_calls(layer) == first
