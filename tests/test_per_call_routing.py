"""Routes belong to each call: interleaved generations, threads, interrupted forwards, chunked prefill,
force_gate per thread, one precision for decisions, all-closed training and the base layer's output."""
import contextlib
import copy
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from concurrent_runs import run_in_threads
from steered_routers import LinearRouter, PatternRouter, splitting_router
from tiny_models import padded_batch, tiny_causal_lm, tiny_peft_model
from torch import nn
from transformers import DynamicCache, GenerationConfig, LlamaModel, StaticCache

from gatedlora import GatedLoraConfig, GatedLoRALinear, force_gate, get_router, patch_model
from gatedlora.call_state import RouteDecision, output_cache
from gatedlora.routing import last_real_positions

LAYERS, ROUTER_LAYER = 4, 1
CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def prism_model(arch="llama"):
    """A tiny PEFT model (adapter on blocks 2-3) patched with a router that opens A's sequences 0 and 3
    and B's sequences 1 and 2: two batches of the same size with opposite routes."""
    model = tiny_peft_model(arch, layers=LAYERS, layers_to_transform=list(range(ROUTER_LAYER + 1, LAYERS)))
    a = padded_batch([7, 4, 9, 5], 9, seed=3)
    b = padded_batch([6, 8, 3, 8], 8, seed=11)
    routes = {"a": [True, False, False, True], "b": [False, True, True, False]}
    router = splitting_router(model, [(*a, routes["a"]), (*b, routes["b"])], ROUTER_LAYER)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
    return model, {"a": a, "b": b}, {k: torch.tensor(v) for k, v in routes.items()}


def greedy_steps(model, ids, mask):
    """Prefill, then one greedy decode step per next(): yields the last position's logits [B, V]."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = output_cache(out)
    while True:
        logits = out.logits[:, -1]
        yield logits
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=logits.argmax(-1, keepdim=True), attention_mask=mask, use_cache=True, **{CACHE: cache})


def alone(model, batch, steps):
    generation = greedy_steps(model, *batch)
    return [next(generation) for _ in range(steps)]


def base_logits(ids, mask, arch="llama"):
    """The base model's logits: PEFT's own disable_adapter() on an unpatched twin of prism_model's model."""
    twin = tiny_peft_model(arch, layers=LAYERS, layers_to_transform=list(range(ROUTER_LAYER + 1, LAYERS)))
    with torch.no_grad(), twin.disable_adapter():
        return twin(input_ids=ids, attention_mask=mask).logits


def gated_layer(model):
    return next(m for m in model.modules() if isinstance(m, GatedLoRALinear))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_interleaved_generations_each_decode_with_their_own_prefill_decision(arch):
    model, batches, routes = prism_model(arch)
    with torch.no_grad():
        expected = {name: alone(model, batch, 4) for name, batch in batches.items()}
        a, b = greedy_steps(model, *batches["a"]), greedy_steps(model, *batches["b"])
        got = {"a": [next(a)], "b": [next(b)]}
        for _ in range(3):
            got["a"].append(next(a))
            model(input_ids=batches["a"][0][:2], attention_mask=batches["a"][1][:2])  # any forward in between
            got["b"].append(next(b))
    for name in batches:
        for step, (g, e) in enumerate(zip(got[name], expected[name])):
            assert torch.equal(g, e), (name, step)
    assert not torch.equal(expected["a"][1], alone_with_routes_forced(model, batches["a"], routes["b"]))


def alone_with_routes_forced(model, batch, routes):
    """A's first decode step had it used ``routes`` (a PatternRouter in place of the steered one)."""
    route = get_router(model)
    steered, route.router = route.router, PatternRouter(40)
    route.router.pattern = routes.float()
    try:
        return alone(model, batch, 2)[1]
    finally:
        route.router = steered


def test_threads_generating_with_different_routes_each_match_their_run_alone():
    model, batches, routes = prism_model()
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                   return_dict_in_generate=True)

    def generate(name):
        ids, mask = batches[name]
        out = model.generate(input_ids=ids, attention_mask=mask, **options)
        decided = get_router(model).routes_of(out).decisions
        return out.sequences, torch.stack(out.scores, 1), decided, get_router(model).last_decisions

    with torch.no_grad():
        solo = {name: generate(name) for name in batches}
    assert not torch.equal(solo["a"][0], solo["b"][0])
    results = run_in_threads(generate, list(batches), repeats=3)
    for name in batches:
        for sequences, scores, decided, last in results[name]:
            assert torch.equal(sequences, solo[name][0])
            finite = torch.isfinite(solo[name][1])
            assert torch.equal(torch.isfinite(scores), finite)
            assert torch.equal(scores[finite], solo[name][1][finite])
            assert torch.equal(decided, routes[name]) and torch.equal(last, routes[name])  # per thread


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["block 2", "embedding"])
def test_a_forward_that_raises_leaves_nothing_behind(error, where):
    model, batches, routes = prism_model()
    hf = model.base_model.model
    target = hf.model.layers[2] if where == "block 2" else hf.model.embed_tokens

    def interrupt(module, args, output):
        raise error("stop")

    with torch.no_grad():
        expected = alone(model, batches["a"], 3)
        a = greedy_steps(model, *batches["a"])
        got = [next(a)]
        handle = target.register_forward_hook(interrupt)
        cache = DynamicCache()
        try:
            with pytest.raises(error):
                model(input_ids=batches["b"][0], attention_mask=batches["b"][1], use_cache=True, **{CACHE: cache})
        finally:
            handle.remove()
        assert get_router(model).routes_of(cache) is None  # no decision on the failed prefill's cache
        assert torch.equal(get_router(model).last_decisions, routes["a"])  # this thread's routes: still A's
        with pytest.raises(RuntimeError, match="sequence gate not decided yet"):
            gated_layer(model)(torch.randn(4, 1, 40))  # no forward state left in this thread
        got += [next(a), next(a)]
    for step, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), step


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_prefill_routes_from_the_last_real_token_of_the_whole_prompt(arch):
    model, batches, routes = prism_model(arch)
    ids, mask = batches["b"]  # left padded: sequence 2 (3 tokens of 8) has a first chunk of padding only
    assert not mask[2, :4].any()
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                   return_dict_in_generate=True)
    with torch.no_grad():
        whole = model.generate(input_ids=ids, attention_mask=mask, **options)
        chunked = model.generate(input_ids=ids, attention_mask=mask, prefill_chunk_size=4, **options)
    route = get_router(model)
    assert torch.equal(route.routes_of(whole).decisions, routes["b"])
    assert torch.equal(route.routes_of(chunked).decisions, routes["b"])
    assert torch.equal(chunked.sequences, whole.sequences)
    scores, reference = torch.stack(chunked.scores, 1), torch.stack(whole.scores, 1)
    finite = torch.isfinite(reference)
    assert torch.equal(torch.isfinite(scores), finite)
    # chunks attend over the cache in another order of summation than one pass: rounding, not routing
    assert (scores[finite] - reference[finite]).abs().max() < 1e-4


def batch_a_logits():
    """A routed model, a function giving its logits on batch "a", and those of the model as it is and of the base."""
    model, batches, _ = prism_model()
    ids, mask = batches["a"]

    def logits():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    return model, logits, logits(), base_logits(ids, mask)


def test_force_gate_is_per_thread_nests_and_restores_exactly():
    model, logits, free, base = batch_a_logits()
    with force_gate(model, 1.0):
        lora = logits()
    assert not torch.equal(free, base) and not torch.equal(free, lora) and not torch.equal(lora, base)

    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def forcing_thread():
        with force_gate(model, 0.0):
            entered.set()
            checked.wait()
            seen["forced"] = logits()
        seen["after"] = logits()

    thread = threading.Thread(target=forcing_thread)
    thread.start()
    entered.wait()
    seen["other thread meanwhile"] = logits()  # while the forcing thread sits inside its block
    checked.set()
    thread.join()
    assert torch.equal(seen["forced"], base)
    assert torch.equal(seen["other thread meanwhile"], free)
    assert torch.equal(seen["after"], free)

    with force_gate(model, 1.0):
        with force_gate(model, 0.0):
            assert torch.equal(logits(), base)
        assert torch.equal(logits(), lora)
    assert torch.equal(logits(), free)
    closed, opened = force_gate(model, 0.0), force_gate(model, 1.0)
    closed.__enter__()
    opened.__enter__()
    closed.__exit__(None, None, None)  # the outer block ends first (two generators, two asyncio tasks)
    assert torch.equal(logits(), lora)
    opened.__exit__(None, None, None)
    assert torch.equal(logits(), free) and gated_layer(model).forced_gate is None


def test_two_threads_force_gate_blocks_leave_the_model_unforced():
    model, batches, _ = prism_model()
    layers = [m for m in model.modules() if isinstance(m, GatedLoRALinear)]
    both_inside, seen = threading.Barrier(2), []

    def worker(value, wait_first):
        with force_gate(model, value):
            both_inside.wait()
            if wait_first:
                both_inside.wait()  # leave second
            seen.append((value, {m.forced_gate for m in layers}))
        if not wait_first:
            both_inside.wait()
        seen.append((None, {m.forced_gate for m in layers}))

    threads = [threading.Thread(target=worker, args=(0.0, True)), threading.Thread(target=worker, args=(1.0, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen, key=repr) == sorted([(0.0, {0.0}), (1.0, {1.0}), (None, {None}), (None, {None})], key=repr)
    assert {m.forced_gate for m in layers} == {None}


def test_a_block_left_in_another_thread_ends_where_it_began():
    """A generator holding a force_gate block, resumed by another worker (as a web server streams a response):
    the block applies in the thread it began in and ends there, wherever its ``with`` is left; it used to stay
    in force there for good, and leaving it elsewhere raised an AttributeError."""
    model, logits, free, base = batch_a_logits()

    def stream():
        with force_gate(model, 0.0):
            yield logits()
            yield logits()

    with ThreadPoolExecutor(1) as began, ThreadPoolExecutor(1) as resumed:
        steps = stream()
        assert torch.equal(began.submit(next, steps).result(), base)
        assert torch.equal(resumed.submit(next, steps).result(), free)  # per thread: not forced here
        with pytest.raises(StopIteration):
            resumed.submit(next, steps).result()  # leaves the block in this thread
        assert torch.equal(began.submit(logits).result(), free)
        assert torch.equal(resumed.submit(logits).result(), free)
        assert {began.submit(lambda: gated_layer(model).forced_gate).result(), gated_layer(model).forced_gate} == {None}


@pytest.mark.slow
def test_a_compiled_model_needs_no_new_graph_after_a_threads_block_ends():
    """A thread whose force_gate block has ended reads as one that never forced, also while another thread's block
    is open: a compiled model reuses its graph there (an emptied per-thread record read differently and cost one
    more graph, toward Dynamo's recompile limit)."""
    model = tiny_peft_model("llama", layers=2)
    patch_model(model)
    ids, mask = padded_batch([5, 8], 8)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def run():
        with torch.no_grad():
            return compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def forced():
        with force_gate(model, 0.0):
            return run()

    torch._dynamo.reset()  # the code objects are shared with other tests' compiled models, and so is the limit
    try:
        compiled = torch.compile(model.base_model.model, backend=counting_backend)
        free = run()  # this thread never forces
        with ThreadPoolExecutor(1) as worker:
            assert not torch.equal(worker.submit(forced).result(), free)
        held, release = threading.Event(), threading.Event()

        def hold_a_block():
            with force_gate(model, 1.0):
                held.set()
                release.wait()

        holder = threading.Thread(target=hold_a_block)
        holder.start()
        held.wait()
        for _ in range(2):  # (its first read of its per-thread slot finds none, its second finds it empty)
            assert torch.equal(run(), free)  # no block of its own while another thread's is open
        count = len(graphs)
        with ThreadPoolExecutor(1) as worker:
            assert not torch.equal(worker.submit(forced).result(), free)
            assert torch.equal(worker.submit(run).result(), free)  # its block has ended; the holder's is open
        release.set()
        holder.join()
        assert len(graphs) == count
    finally:
        torch._dynamo.reset()


def test_bf16_router_at_the_threshold_routes_a_sequence_the_same_whatever_its_batch_mates():
    """p = bf16(0.7) = 0.69921875 is below 0.7 in fp32: closed alone, next to an open or a closed sequence."""
    model, batches, _ = prism_model()
    router = PatternRouter(40, torch.bfloat16)
    router.pattern = torch.zeros(4)
    get_router(model).router = router
    get_router(model).threshold = 0.7
    ids, mask = batches["a"]
    base = base_logits(ids, mask)
    for mate in (0.9, 0.1):
        router.pattern = torch.tensor([0.7, mate, mate, mate])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(logits[0], base[0]), mate  # closed: the base model, bitwise
        assert torch.equal(logits[1:], base[1:]) == (mate < 0.7)
        assert get_router(model).last_decisions.tolist() == [False] + [mate > 0.7] * 3
        assert get_router(model).last_probabilities.dtype == torch.float32


def test_all_closed_training_batch_backpropagates_zero_into_the_lora_weights():
    model, batches, _ = prism_model()
    router = PatternRouter(40)
    router.pattern = torch.zeros(4)
    get_router(model).router = router
    ids, mask = batches["a"]
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None and torch.count_nonzero(g) == 0 for g in lora.values())
    assert not get_router(model).last_decisions.any()


def test_a_forward_hook_on_the_base_layer_sees_its_output_unchanged():
    model, batches, _ = prism_model()
    layer = gated_layer(model)
    kept = {}

    def keep(module, args, output):
        kept["output"], kept["copy"] = output, output.clone()

    handle = layer.base_layer.register_forward_hook(keep)
    ids, mask = batches["a"]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        handle.remove()
        assert torch.equal(kept["output"], kept["copy"])  # the LoRA term went into a new tensor
        with force_gate(model, 1.0):
            x = torch.randn(4, 3, layer.in_features)
            out = layer(x)
            handle = layer.base_layer.register_forward_hook(keep)
            hooked = layer(x)  # out of place gives the same values as in place
            handle.remove()
    assert torch.equal(hooked, out) and not torch.equal(kept["output"], out)


def test_routes_are_readable_per_cache_and_the_threshold_settable_after_patching(tmp_path):
    import gatedlora

    model, batches, routes = prism_model()
    route = get_router(model)
    ids, mask = batches["a"]
    with torch.no_grad():
        expected = alone(model, batches["a"], 2)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        decision = route.routes_of(out)
        assert torch.equal(decision.decisions, routes["a"]) and decision.threshold == 0.5
        assert float(decision.probabilities[routes["a"]].min()) < 0.99  # sigmoid(4): open at 0.5, closed at 0.99
        route.threshold = 0.99
        model(input_ids=ids, attention_mask=mask)
        assert not route.last_decisions.any()  # the next prefill routes with the new threshold
        step = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1),
                     use_cache=True, **{CACHE: output_cache(out)}).logits[:, -1]
        assert torch.equal(step, expected[1])  # a generation keeps the threshold of its prefill
    with pytest.raises(ValueError, match=r"get_router\(model\).threshold must be a number in \(0, 1\)"):
        route.threshold = 1.5
    layer = next(m for m in model.modules() if isinstance(m, GatedLoRALinear))
    assert "threshold=0.99" in repr(layer)  # the router's, which the routes use (the layer printed its own 0.5)
    gatedlora.save_pretrained(model, tmp_path)
    assert '"threshold": 0.99' in (tmp_path / "gatedlora_config.json").read_text()


class ToyBlock(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        return x + torch.tanh(self.proj(x))


class LegacyCacheModel(nn.Module):
    """Takes ``past_key_values`` as a legacy tuple of (key, value) per block and returns a new tuple each step."""

    def __init__(self, layers=3, hidden=16, vocab=50):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(ToyBlock(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
        x = self.embed(input_ids)
        cache = []
        for i, block in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i][0]
            keys = x if past is None else torch.cat([past, x], dim=1)
            x = block(x + keys.mean(dim=1, keepdim=True))  # each token sees the mean of everything so far
            cache.append((keys, keys))
        return {"logits": self.head(x), "past_key_values": tuple(cache) if use_cache else None}


def test_legacy_tuple_caches_passed_as_past_key_values_carry_their_routes():
    model = LegacyCacheModel()
    router = LinearRouter(16)
    with torch.no_grad():
        router.proj.weight.normal_()
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, router=router, target_modules=["proj"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedLoRALinear):
                m.lora_B["default"].weight.normal_()
    gen = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, 50, (n, 5), generator=gen) for n in (2, 3)}

    def steps(ids):
        out = model(ids, use_cache=True)
        while True:
            yield out["logits"][:, -1]
            token = out["logits"][:, -1:].argmax(-1)
            out = model(token, past_key_values=out["past_key_values"], use_cache=True)

    with torch.no_grad():
        expected = {n: [x for x, _ in zip(steps(ids), range(3))] for n, ids in prompts.items()}
        two, three = steps(prompts[2]), steps(prompts[3])
        got = {2: [next(two)], 3: [next(three)]}
        for _ in range(2):
            got[2].append(next(two))
            got[3].append(next(three))
    assert get_router(model).last_decisions.any() and not get_router(model).last_decisions.all()
    for n in prompts:
        assert all(torch.equal(g, e) for g, e in zip(got[n], expected[n])), n


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_prefill_and_decode_route_on_the_device_in_one_graph(arch):
    """torch.compile(fullgraph=True): no graph break from routing (no host read of a decision); the LoRA
    term is the registered op, one node per gated layer; outputs and routes equal eager."""
    model, batches, routes = prism_model(arch)
    hf = model.base_model.model
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(hf, fullgraph=True, backend=recording_backend)
    ids, mask = batches["a"]
    step_mask = torch.cat([mask, mask.new_ones(4, 1)], dim=1)
    with torch.no_grad():
        eager = hf(input_ids=ids, attention_mask=mask, use_cache=True)
        token = eager.logits[:, -1:].argmax(-1)
        eager_step = hf(input_ids=token, attention_mask=step_mask, use_cache=True, **{CACHE: output_cache(eager)})
        prefill = compiled(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = output_cache(prefill)
        assert torch.equal(get_router(model).routes_of(cache).decisions, routes["a"])
        step = compiled(input_ids=token, attention_mask=step_mask, use_cache=True, **{CACHE: cache})
        assert len(graphs) == 2  # one graph for the prefill, one for the decode step: no break
        with force_gate(model, 0.0):  # a guard on the per-thread override: a new graph, not a stale one
            forced = compiled(input_ids=ids, attention_mask=mask).logits
        unforced = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(forced, base_logits(ids, mask, arch), rtol=0, atol=1e-5)
    torch.testing.assert_close(unforced, eager.logits, rtol=0, atol=1e-5)
    graphs = graphs[:2]
    gated = sum(isinstance(m, GatedLoRALinear) for m in model.modules())
    for gm in graphs:
        ops = [n for n in gm.graph.nodes if n.op == "call_function" and "gated_lora_add_" in str(n.target)]
        assert len(ops) == gated
    torch.testing.assert_close(prefill.logits, eager.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(step.logits, eager_step.logits, rtol=0, atol=1e-5)
    assert torch.equal(get_router(model).last_decisions, routes["a"])


def test_a_static_cache_reset_for_a_new_prompt_is_routed_again():
    """A StaticCache counts its tokens on the device (not read at decode: that would sync) and is reused after
    reset(): reset() drops its routes, so a new prompt on it is routed, and each decode step on it continues
    its prompt's decision. generate() with a static cache passes a prepared 4D attention mask, from which
    the router finds the last real tokens too."""
    model, batches, routes = prism_model()
    config = model.base_model.model.config

    def steps(cache, ids, mask):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE: cache})
        got = [out.logits[:, -1]]
        for _ in range(2):
            mask = torch.cat([mask, mask.new_ones(4, 1)], dim=1)
            out = model(input_ids=got[-1].argmax(-1, keepdim=True), attention_mask=mask, use_cache=True,
                        **{CACHE: cache})
            got.append(out.logits[:, -1])
        return got

    with torch.no_grad():
        expected = {name: steps(StaticCache(config=config, max_cache_len=16), *batch)
                    for name, batch in batches.items()}
        reused = StaticCache(config=config, max_cache_len=16)
        for name in ("a", "b", "a"):
            reused.reset()
            assert get_router(model).routes_of(reused) is None
            got = steps(reused, *batches[name])
            assert all(torch.equal(g, e) for g, e in zip(got, expected[name])), name
            assert torch.equal(get_router(model).routes_of(reused).decisions, routes[name])
        options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        for name, (ids, mask) in batches.items():
            dynamic = model.generate(input_ids=ids, attention_mask=mask, **options)
            out = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **options)
            assert torch.equal(out.sequences, dynamic.sequences), name
            assert torch.equal(get_router(model).routes_of(out).decisions, routes[name])


ASSISTED = {"prompt_lookup": dict(prompt_lookup_num_tokens=3), "assistant_model": "assistant",
            "early_exit": dict(assistant_early_exit=3)}


def assisted_options(mode):
    if ASSISTED[mode] == "assistant":  # the base model as the draft model
        return dict(assistant_model=tiny_causal_lm("llama", LAYERS, seed=0))
    return ASSISTED[mode]


@pytest.mark.parametrize("mode", list(ASSISTED))
def test_assisted_generation_routes_from_the_prompt_not_the_drafts_candidates(mode):
    """transformers 5's assisted generation has no prefill of its own: its first forward covers the prompt and
    the draft's candidates on an empty cache. The router must read the prompt's last token (a routing pass),
    as plain generate does, not the last guessed one. The router here routes each prompt one way and the
    first forward's input (prompt + candidates) the other."""
    model = tiny_peft_model(layers=LAYERS, layers_to_transform=list(range(ROUTER_LAYER + 1, LAYERS)))
    prompts = {True: torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7]]), False: torch.tensor([[11, 12, 13, 14, 11, 12, 13]])}
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                   return_dict_in_generate=True, **assisted_options(mode))
    backbone = model.base_model.model.model
    expected, first_inputs = {}, {}
    for opened, prompt in prompts.items():
        seen = []
        hook = backbone.register_forward_pre_hook(lambda m, a, k, seen=seen: seen.append(k["input_ids"]),
                                                  with_kwargs=True)
        with torch.no_grad(), (contextlib.nullcontext() if opened else model.disable_adapter()):
            expected[opened] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)
        hook.remove()
        # the main model's first forward: the prompt and candidates (early exit's draft runs the prompt first)
        first_inputs[opened] = next(ids for ids in seen if ids.shape[1] > prompt.shape[1])
    batches = [(ids, torch.ones_like(ids), [want]) for opened, prompt in prompts.items()
               for ids, want in ((prompt, opened), (first_inputs[opened], not opened))]
    router = splitting_router(model, batches, ROUTER_LAYER)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
    for opened, prompt in prompts.items():
        with torch.no_grad():
            plain = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2)
            assert get_router(model).last_decisions.tolist() == [opened]
            assert plain.shape[1] == prompt.shape[1] + 2
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)
        assert get_router(model).routes_of(out).decisions.tolist() == [opened], mode
        assert torch.equal(out.sequences, expected[opened].sequences)
        logits, reference = torch.stack(out.logits, 1), torch.stack(expected[opened].logits, 1)
        if opened:  # the adapter: PEFT's own assisted generation
            torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
        else:  # the base model, bit for bit
            assert torch.equal(logits, reference)


def test_a_generation_config_passed_positionally_is_read_for_chunked_prefill_and_assisted_generation():
    """generate(ids, GenerationConfig(...)) as transformers' signature allows: its prefill_chunk_size and
    prompt_lookup_num_tokens are seen as when it is passed as generation_config=."""
    model, batches, routes = prism_model()
    ids, mask = batches["b"]  # left padded: sequence 2 (3 tokens of 8) has a first chunk of padding only
    config = GenerationConfig(prefill_chunk_size=4, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        whole = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                               do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        by_name = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        positional = model.generate(ids, config, attention_mask=mask)  # PeftModel.generate passes it on as is
        inner = model.base_model.model.generate(ids, config, None, attention_mask=mask)  # the patched generate
    for out in (whole, by_name, positional, inner):
        assert torch.equal(get_router(model).routes_of(out).decisions, routes["b"])
        assert torch.equal(out.sequences, whole.sequences)
    assert config.prefill_chunk_size == 4  # the caller's config is left as it was
    prompt = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7]])
    with torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=1)
        decision = get_router(model).last_decisions
        lookup = GenerationConfig(prompt_lookup_num_tokens=3, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                  return_dict_in_generate=True)
        out = model.generate(prompt, lookup)
    assert torch.equal(get_router(model).routes_of(out).decisions, decision)
    assert lookup.prompt_lookup_num_tokens == 3


def static_cache_mask_routed_as_dynamic(model, backbone, side):
    """Patch ``model`` with a router that opens sequences 0 and 3 of a padded batch, generate with a dynamic and
    a static cache: the routes, tokens and scores must be equal. Returns the attention mask ``backbone`` got
    at the static generation's prefill."""
    ids, mask = padded_batch([7, 4, 9, 5], 9, side=side, seed=3)
    routes = torch.tensor([True, False, False, True])
    router = splitting_router(model, [(ids, mask, routes.tolist())], ROUTER_LAYER)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
    masks = []
    hook = backbone.register_forward_pre_hook(lambda m, a, k: masks.append(k.get("attention_mask")), with_kwargs=True)
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        dynamic = model.generate(input_ids=ids, attention_mask=mask, **options)
        masks.clear()
        static = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **options)
    hook.remove()
    for out in (dynamic, static):
        assert torch.equal(get_router(model).routes_of(out).decisions, routes)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.scores, 1), torch.stack(dynamic.scores, 1), rtol=0, atol=1e-5)
    return masks[0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_static_cache_generate_on_qwen2_routes_from_its_dict_of_prepared_masks(side, attention):
    """generate(cache_implementation="static") on a model whose config names layer_types (Qwen2) passes the
    backbone a dict of prepared 4D masks, one per attention type (bool for SDPA, additive float for eager):
    the routes, tokens and scores equal the dynamic cache's, left or right padded."""
    model = tiny_peft_model("qwen2", layers=LAYERS, layers_to_transform=list(range(ROUTER_LAYER + 1, LAYERS)))
    model.base_model.model.config._attn_implementation = attention
    prefill_mask = static_cache_mask_routed_as_dynamic(model, model.base_model.model.model, side)
    assert isinstance(prefill_mask, dict) and prefill_mask["full_attention"].dim() == 4


@pytest.mark.parametrize("side", ["left", "right"])
def test_static_cache_generate_on_bloom_routes_from_its_mask_padded_to_the_cache(side):
    """BLOOM's generate() with a static cache pads the 2D mask on the right to the cache's length (its own
    create_masks_for_generate): the prompt is the mask's first columns. The router read one token too early
    there, so routes, tokens and scores differed from the dynamic cache's."""
    from peft import LoraConfig, get_peft_model
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    base = BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=40, n_layer=LAYERS, n_head=4, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2)).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query_key_value", "dense_4h_to_h"],
                                            layers_to_transform=list(range(ROUTER_LAYER + 1, LAYERS)),
                                            init_lora_weights=False)).eval()
    prefill_mask = static_cache_mask_routed_as_dynamic(model, model.base_model.model.transformer, side)
    assert prefill_mask.dim() == 2 and prefill_mask.shape[1] > 9  # the case: padded to the cache's length


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_last_real_positions_from_prepared_sliding_window_masks(side, dtype):
    """A prepared 4D mask marks a sequence's real tokens on its diagonal, for a sliding window too: there the
    last query (right padding longer than the window) sees none of the prompt, its diagonal still does."""
    lengths, total, window = [6, 2, 9, 1], 9, 2
    _, mask = padded_batch(lengths, total, side=side)
    query, key = torch.arange(total)[:, None], torch.arange(total)[None, :]
    padding = mask.bool()[:, None, None, :]
    attends = (key <= query)[None, None] & padding  # [B, 1, T, T]
    sliding = attends & (key > query - window)
    prepared = sliding if dtype == torch.bool else torch.zeros(sliding.shape).masked_fill(~sliding, -1e30)
    expected = last_real_positions(mask, 4, total)
    assert expected.tolist() == ([total - 1] * 4 if side == "left" else [n - 1 for n in lengths])
    padded_keys = torch.cat([prepared, prepared[..., :3]], dim=-1)  # a static cache's keys beyond the prompt
    for given in (prepared, padded_keys, {"sliding_attention": prepared},
                  {"full_attention": attends, "sliding_attention": prepared}):
        assert torch.equal(last_real_positions(given, 4, total), expected)


def selected_copy(cache, rows):
    copied = copy.deepcopy(cache)
    copied.batch_select_indices(rows)
    return copied


# operation on a prefilled cache (returns the cache to decode on, or None: the same one), and the rows it keeps
CACHE_BATCH_OPERATIONS = {
    "reorder_cache": (lambda cache: cache.reorder_cache(torch.tensor([1, 0, 3, 2])), torch.tensor([1, 0, 3, 2])),
    "batch_select_indices": (lambda cache: cache.batch_select_indices(torch.tensor([0, 2, 3])),
                             torch.tensor([0, 2, 3])),
    "batch_repeat_interleave": (lambda cache: cache.batch_repeat_interleave(2), torch.arange(4).repeat_interleave(2)),
    "deepcopy_then_select": (lambda cache: selected_copy(cache, [3, 1]), torch.tensor([3, 1])),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("operation", list(CACHE_BATCH_OPERATIONS))
def test_routes_follow_the_caches_own_batch_operations(operation, device):
    """A KV cache's reorder_cache / batch_select_indices / batch_repeat_interleave move each sequence's keys
    and values: its route moves with them. A decode step then gives each sequence the base model bit for
    bit or PEFT's adapter, as routed at its prefill (a deep copy of the cache is one of its own). On a GPU
    the routes are device tensors, selected there with the operation's host-side indices."""
    model, batches, routes = prism_model()
    twin = tiny_peft_model(layers=LAYERS, layers_to_transform=list(range(ROUTER_LAYER + 1, LAYERS)))
    model.to(device)
    twin.to(device)
    apply, rows = CACHE_BATCH_OPERATIONS[operation]
    ids, mask = (t.to(device) for t in batches["a"])
    step = torch.tensor([[11], [12], [13], [14]], device=device)
    routes = {name: r.to(device) for name, r in routes.items()}

    def decode(m):
        cache = DynamicCache(config=m.base_model.model.config)
        m(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE: cache})
        result = apply(cache)
        cache = cache if result is None else result  # the deep copy, selected
        step_mask = torch.cat([mask, torch.ones_like(step)], 1)[rows]
        return m(input_ids=step[rows], attention_mask=step_mask, **{CACHE: cache}).logits[:, -1], cache

    with torch.no_grad():
        peft, _ = decode(twin)
        with twin.disable_adapter():
            base, _ = decode(twin)
        got, cache = decode(model)
        want = routes["a"][rows]
        assert torch.equal(get_router(model).last_decisions, want)
        original = DynamicCache(config=model.base_model.model.config)
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE: original})
    assert torch.equal(get_router(model).routes_of(cache).decisions, want)
    assert torch.equal(got[~want], base[~want])
    torch.testing.assert_close(got[want], peft[want], rtol=0, atol=1e-5)
    if operation == "deepcopy_then_select":  # the original cache keeps its batch and routes
        selected_copy(original, [3, 1])
        assert torch.equal(get_router(model).routes_of(original).decisions, routes["a"])
        assert original.layers[0].keys.shape[0] == 4


def test_routes_on_a_cache_follow_host_facts_and_several_adapters():
    """RouteDecision.select: the host-side facts the layers shortcut on are seen again for the new batch (one
    open span, all closed, one route for all), and several adapters' routes follow as one adapter's do."""
    model, batches, routes = prism_model()
    ids, mask = batches["a"]  # routes T F F T
    with torch.no_grad():
        decision = get_router(model).routes_of(model(input_ids=ids, attention_mask=mask, use_cache=True))
    assert decision.scattered and decision.open_span is None
    closed = decision.select(torch.tensor([1, 2]))
    assert closed.all_closed and not closed.all_open and closed.batch == 2
    span = decision.select(torch.tensor([1, 0, 3, 2]))
    assert span.open_span == (1, 3) and not span.scattered
    assert decision.select(torch.tensor([0, 3, 0])).all_open
    multi = RouteDecision(torch.zeros(3, 4), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, True, False]), 0.5,
                          multi_routes=torch.tensor([2, 2, 0]))
    one_route = multi.select(torch.tensor([1, 0]))
    assert one_route.uniform_route == 2 and one_route.routes.tolist() == [2, 2]
    assert multi.select(torch.tensor([2])).all_closed


@pytest.mark.parametrize("module", ["backbone", "causal_lm"])
def test_return_dict_false_outputs_carry_their_routes(module):
    """With return_dict=False a model returns a tuple (the ModelOutput's non-None entries): the cache made at
    the prefill is found there and carries its decision, so a decode step on it continues the generation
    exactly as with return_dict=True."""
    model, batches, routes = prism_model()
    target = model.base_model.model.model if module == "backbone" else model.base_model.model
    ids, mask = batches["a"]
    step, step_mask = torch.full((4, 1), 9), torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        as_dict = target(input_ids=ids, attention_mask=mask, use_cache=True)
        expected = target(input_ids=step, attention_mask=step_mask, **{CACHE: output_cache(as_dict)})[0]
        as_tuple = target(input_ids=ids, attention_mask=mask, use_cache=True, return_dict=False)
        assert isinstance(as_tuple, tuple)
        cache = output_cache(as_tuple)
        assert isinstance(cache, DynamicCache)
        assert torch.equal(get_router(model).routes_of(as_tuple).decisions, routes["a"])
        got = target(input_ids=step, attention_mask=step_mask, return_dict=False, **{CACHE: cache})[0]
    assert torch.equal(got, expected)
    assert torch.equal(get_router(model).routes_of(cache).decisions, routes["a"])


def test_output_cache_finds_a_legacy_cache_in_a_tuple_output_not_its_hidden_states():
    k = torch.zeros(2, 1, 3, 4)
    legacy = ((k, k), (k, k))
    hidden_states = (torch.zeros(2, 3, 8), torch.zeros(2, 3, 8))
    assert output_cache((torch.zeros(2, 3, 5), legacy, hidden_states)) is legacy
    assert output_cache((torch.zeros(2, 3, 5), hidden_states)) is None


def test_sequence_gates_generate_on_mamba_whose_cache_counts_no_tokens():
    """A Mamba cache holds state-space layers only: get_seq_length() raises there, and whether a forward
    continues a generation is read from its layers' has_previous_state. Sequences routed to the adapter
    generate PEFT's tokens, those routed to the base model the base model's, and each decode step continues
    its prefill's decision."""
    from peft import LoraConfig, get_peft_model
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    base = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=8, num_hidden_layers=3,
                                        intermediate_size=64, pad_token_id=0)).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["in_proj", "x_proj"], init_lora_weights=False,
                                            layers_to_transform=[1, 2])).eval()
    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                   return_dict_in_generate=True, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        peft = model.generate(input_ids=ids, **options)
        with model.disable_adapter():
            reference = model.generate(input_ids=ids, **options)
    router = PatternRouter(32)
    router.pattern = torch.tensor([1.0, 0.0, 1.0])
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, router=router))
    with torch.no_grad():
        out = model.generate(input_ids=ids, **options)
    want = torch.tensor([True, False, True])
    assert torch.equal(get_router(model).routes_of(out).decisions, want)
    scores, peft_scores, base_scores = (torch.stack(o.scores, 1) for o in (out, peft, reference))
    assert torch.equal(out.sequences[~want], reference.sequences[~want])
    assert torch.equal(scores[~want], base_scores[~want])
    assert torch.equal(out.sequences[want], peft.sequences[want])
    torch.testing.assert_close(scores[want], peft_scores[want], rtol=0, atol=1e-5)


def test_a_routed_cache_is_freed_when_dropped_and_its_copies_are_their_own():
    """The methods a routed cache carries (reset, reorder_cache, ...) hold it weakly: they held it strongly from
    its own dict, a cycle, so every routed cache (its keys and values) outlived its last user until the cyclic
    collector ran. A deep copy and a pickled copy reset and select themselves, not the original."""
    import gc
    import pickle
    import weakref

    model, batches, routes = prism_model()
    ids, mask = batches["a"]
    gc.disable()  # only reference counting frees
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.base_model.model.config)
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE: cache})
            keys = weakref.ref(cache.layers[0].keys)
            copies = {"deepcopy": copy.deepcopy(cache), "pickle": pickle.loads(pickle.dumps(cache))}
            alone = copy.deepcopy({"select": cache.batch_select_indices})["select"]  # holds its copy of the cache
            del cache
            assert keys() is None
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                       return_dict_in_generate=True)
            kept = weakref.ref(generated.past_key_values)
            del generated
            assert kept() is None
    finally:
        gc.enable()
    router = get_router(model)
    alone(torch.tensor([1]))
    assert torch.equal(router.routes_of(alone.cache).decisions, routes["a"][[1]])
    for name, copied in copies.items():
        assert torch.equal(router.routes_of(copied).decisions, routes["a"]), name
        copied.batch_select_indices(torch.tensor([2, 0]))
        assert torch.equal(router.routes_of(copied).decisions, routes["a"][[2, 0]]), name
        assert copied.layers[0].keys.shape[0] == 2, name
        copied.reset()
        assert router.routes_of(copied) is None, name
