"""Training patched models on CPU: a plain loop, transformers.Trainer, checkpointing, bf16 autocast,
train/eval gates."""
import warnings

import pytest
import torch
from torch import nn

from gatedlora import GatedLoraConfig, GatedLoRALinear, force_gate, get_router, patch_model
from gatedlora.reference import gated_lora_reference
from tiny_models import padded_batch, tiny_peft_model

LAYERS = 3
PRISM_LAYERS = list(range(1, LAYERS))  # the adapter after the router's tap layer 0


def batch(lengths=(7, 4, 9, 5), total=9, seed=3):
    ids, mask = padded_batch(list(lengths), total, seed=seed)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def patched(config, seed=0):
    model = tiny_peft_model(layers=LAYERS, layers_to_transform=PRISM_LAYERS, seed=seed)
    return patch_model(model, config)


def grads(model, names=None):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad and (names is None or any(k in n for k in names))}


def loss_and_grads(model, data, **forward):
    model.zero_grad()
    loss = model(**data, **forward).loss
    loss.backward()
    return loss.detach(), grads(model)


def test_train_and_eval_switch_between_soft_and_hard_gates():
    torch.manual_seed(0)
    layer = GatedLoRALinear.fresh(nn.Linear(24, 18), r=4, lora_alpha=8, lora_dropout=0.0, gate="token",
                                  hard=True, train_hard=False)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.gate_weight.normal_()
        layer.gate_bias.zero_()
    x = torch.randn(31, 24)
    ref = {hard: gated_lora_reference(x, layer.base_layer(x).detach(), layer.lora_A["default"].weight,
                                      layer.lora_B["default"].weight, layer.scaling, gate_weight=layer.gate_weight,
                                      gate_bias=layer.gate_bias, hard=hard) for hard in (False, True)}
    assert (ref[True] - ref[False]).abs().max() > 0.1  # soft and hard really differ here
    with torch.no_grad():
        for training, hard in ((True, False), (False, True)):
            layer.train(training)
            assert layer.gates_are_hard == hard
            assert (layer(x).double() - ref[hard]).abs().max() < 1e-5


def test_config_maps_train_gate_and_straight_through_onto_layers():
    model = patched(GatedLoraConfig(gate="token", train_gate="soft", straight_through=True))
    layers = [m for m in model.modules() if isinstance(m, GatedLoRALinear)]
    assert layers and all(m.train_hard is False and m.straight_through and m.hard for m in layers)
    model.train()
    assert not any(m.gates_are_hard for m in layers)
    model.eval()
    assert all(m.gates_are_hard for m in layers)
    with pytest.raises(ValueError, match=r"train_gate must be one of \(None, 'soft', 'hard'\), got 'sometimes'"):
        GatedLoraConfig(train_gate="sometimes")
    with pytest.raises(ValueError, match="straight_through must be a bool, got 1"):
        GatedLoraConfig(straight_through=1)
    assert GatedLoraConfig.from_dict(GatedLoraConfig(train_gate="hard").to_dict()).train_gate == "hard"


def test_plain_loop_trains_lora_and_router_and_keeps_the_base_frozen():
    """PRISM layout (router at block 0, adapter after it), soft gates in training: the loss falls, the
    LoRA weights and the router move, every base weight stays bitwise where it was."""
    model = patched(GatedLoraConfig(gate="sequence", router_layer=0, train_gate="soft"))
    router = get_router(model).router.requires_grad_(True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not any("lora_" in n or "gate_router" in n for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = batch()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    # one fixed batch, full-batch AdamW: every step lowers the loss (4.58 -> 4.17 nats measured)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.25, losses
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    moved = [n for n, v in before.items() if not torch.equal(after[n], v)]
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    assert any(n.startswith("gate_router") for n in moved)
    assert router.training  # model.train() reached the router too


def test_closed_gates_give_the_lora_weights_exactly_zero_gradient():
    data = batch()
    model = patched(GatedLoraConfig(gate="token"))
    model.train()
    _, open_grads = loss_and_grads(model, data)
    lora = {n: g for n, g in open_grads.items() if "lora_" in n}
    assert lora and all(g is not None and torch.count_nonzero(g) > 0 for g in lora.values())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate_bias"):
                param.fill_(-30.0)  # sigmoid(-30 + w.x) < 0.5: every token gate closed
    _, closed_grads = loss_and_grads(model, data)
    for name in lora:
        assert torch.equal(closed_grads[name], torch.zeros_like(lora[name])), name
    with force_gate(model, 0.0):  # forced closed: the adapter is not called, so nothing trainable is in the graph
        assert not model(**data).loss.requires_grad


def test_straight_through_router_learns_while_every_gate_is_closed():
    """Every sequence closed: the layers skip the adapter in eval, but straight-through training still
    runs it so that the router gets dL/dp and can learn to open."""
    data = batch()
    model = patched(GatedLoraConfig(gate="sequence", router_layer=0, straight_through=True))
    router = get_router(model).router.requires_grad_(True)
    with torch.no_grad():
        router.net[-1].bias.fill_(-3.0)  # p = sigmoid(-3) = 0.047 for every prompt
    with torch.no_grad():
        out = model(**data, use_cache=True)
    eval_logits = out.logits
    assert get_router(model).routes_of(out).all_closed  # the host saw it: the layers skip
    assert not get_router(model).last_decisions.any()
    model.train()
    loss, got = loss_and_grads(model, data)
    assert torch.equal(model(**data).logits.detach(), eval_logits)  # closed: the base model in training too
    assert torch.count_nonzero(got["gate_router.router.net.4.bias"]) == 1
    lora = [g for n, g in got.items() if "lora_" in n]
    assert lora and all(torch.count_nonzero(g) == 0 for g in lora)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """Checkpointing re-runs block router_layer in the backward, and with it the routing hook: it must
    change nothing. Non-reentrant (transformers' default): every gradient equals the run without
    checkpointing, the router's included. Reentrant runs block 0 under no_grad, so the router gets no
    gradient from the LM loss: the layers warn, and the LoRA gradients are still right."""
    data = batch()
    config = GatedLoraConfig(gate="sequence", router_layer=0, train_gate="soft")
    reference, model = patched(config), patched(config)
    for m in (reference, model):
        get_router(m).router.requires_grad_(True)
        m.train()
    ref_loss, ref_grads = loss_and_grads(reference, data)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, got = loss_and_grads(model, data, use_cache=False)
    cut_off = [w for w in caught if "router will not learn" in str(w.message)]
    assert torch.equal(loss, ref_loss)
    assert bool(cut_off) == reentrant
    for name, expected in ref_grads.items():
        if reentrant and name.startswith("gate_router"):
            assert got[name] is None
        else:
            torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(get_router(model).last_probabilities, get_router(reference).last_probabilities)


def test_checkpointed_backward_recomputes_with_its_own_threads_forward():
    """A thread's checkpointed backward recomputes its blocks with its own forward's routing, though another
    thread ran a forward that records gradients in between (on the CPU autograd runs the backward in the
    thread that calls it)."""
    import threading

    from steered_routers import splitting_router

    mine, other = batch(), batch(lengths=(6, 8, 3, 8), seed=11)
    model = tiny_peft_model(layers=LAYERS, layers_to_transform=PRISM_LAYERS)
    router = splitting_router(model, [(mine["input_ids"], mine["attention_mask"], [True, False, False, True]),
                                      (other["input_ids"], other["attention_mask"], [False, True, True, False])], 0)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, router=router)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, expected = loss_and_grads(model, mine, use_cache=False)
    forward_done, other_done, got = threading.Event(), threading.Event(), {}

    def first():
        loss = model(**mine, use_cache=False).loss
        forward_done.set()
        other_done.wait(60)
        got["grads"] = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if "lora_" in n])

    def second():
        forward_done.wait(60)
        try:
            model(**other, use_cache=False)  # records gradients, never backpropagated
        finally:
            other_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    assert "grads" in got and names
    for name, gradient in zip(names, got["grads"]):
        torch.testing.assert_close(gradient, expected[name], rtol=0, atol=0, msg=name)


def test_bf16_autocast_gradients_are_as_good_as_peft():
    """bf16 autocast on the CPU, all gates open: the patched model's LoRA gradients are within 2x of
    PEFT's own bf16 error, both measured against the fp32 run."""
    data = batch()
    peft_model = tiny_peft_model(layers=LAYERS, layers_to_transform=PRISM_LAYERS).train()
    model = patched(GatedLoraConfig(gate="token")).train()

    def run(m, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, g = loss_and_grads(m, data)
        return loss, {n: v for n, v in g.items() if "lora_" in n}

    exact_loss, exact = run(peft_model, False)
    peft_loss, peft = run(peft_model, True)
    ours_loss, ours = run(model, True)
    assert torch.isfinite(ours_loss) and abs(float(ours_loss) - float(exact_loss)) < 0.05
    assert ours.keys() == peft.keys() == exact.keys()
    for name in exact:
        assert ours[name].dtype == torch.float32
        ours_err = (ours[name] - exact[name]).abs().max()
        peft_err = (peft[name] - exact[name]).abs().max()
        assert ours_err <= 2 * peft_err + 1e-6, (name, float(ours_err), float(peft_err))


def test_transformers_trainer_trains_a_patched_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = patched(GatedLoraConfig(gate="sequence", router_layer=0, straight_through=True))
    data = batch(lengths=(9, 9, 9, 9, 9, 9, 9, 9), seed=5)
    dataset = [{k: v[i] for k, v in data.items()} for i in range(8)]  # any indexable of dicts will do
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, seed=0, gradient_checkpointing=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 10 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.25, losses


def test_trainer_checkpoints_keep_gates_and_router_and_a_resumed_run_ends_as_the_whole_one(tmp_path):
    """With SaveGatedLoraCallback each Trainer checkpoint holds the trained router beside PEFT's LoRA files
    (PEFT's save keeps LoRA weights only), and a run resumed from one, after load_pretrained, ends with the
    uninterrupted run's router and LoRA weights."""
    from transformers import Trainer, TrainingArguments

    from gatedlora import SaveGatedLoraCallback, load_pretrained

    data = batch(lengths=(9, 9, 9, 9, 9, 9, 9, 9), seed=5)
    dataset = [{k: v[i] for k, v in data.items()} for i in range(8)]

    def train(output, resume=None, load=True):
        model = patched(GatedLoraConfig(gate="sequence", router_layer=0, straight_through=True))
        if resume is not None and load:
            load_pretrained(model, resume)
        args = TrainingArguments(output_dir=str(output), max_steps=6, per_device_train_batch_size=4,
                                 learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], save_steps=3,
                                 use_cpu=True, seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=dataset,
                callbacks=[SaveGatedLoraCallback()]).train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    whole = train(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert all((checkpoint / f).is_file() for f in ("gatedlora_model.safetensors", "adapter_model.safetensors"))
    resumed = train(tmp_path / "resumed", resume=checkpoint)
    assert whole.keys() == resumed.keys() and any(n.startswith("gate_router.") for n in whole)
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-6, atol=1e-7, msg=name)
    # resumed in the checkpoint's own folder: after load_pretrained nothing is said; without it the router is a fresh
    # one under the saved optimizer state, which is said, not left silent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tmp_path / "whole", resume=checkpoint)
    assert not [w for w in caught if "SaveGatedLoraCallback" in str(w.message)]
    with pytest.warns(UserWarning, match=r"training resumes at step 3, but the gates and router are not those saved "
                                         r"in .*checkpoint-3.*Call gatedlora.load_pretrained"):
        train(tmp_path / "whole", resume=checkpoint, load=False)


def best_at_end_trainer(model, output):
    """A Trainer of 3 steps with a checkpoint and an evaluation at each and load_best_model_at_end, the highest loss
    "best" (an early checkpoint, whose weights differ from the last step's), with SaveGatedLoraCallback."""
    from transformers import Trainer, TrainingArguments

    from gatedlora import SaveGatedLoraCallback

    data = batch(lengths=(9, 9, 9, 9, 9, 9, 9, 9), seed=5)
    dataset = [{k: v[i] for k, v in data.items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(output), max_steps=3, per_device_train_batch_size=8, learning_rate=5e-2,
                             lr_scheduler_type="constant", report_to=[], save_steps=1, eval_strategy="steps",
                             eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
                             greater_is_better=True, use_cpu=True, seed=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                   callbacks=[SaveGatedLoraCallback()])


def test_the_best_checkpoint_loaded_at_the_end_brings_its_gates_and_router_too(tmp_path):
    """load_best_model_at_end: the Trainer reloads the best checkpoint's LoRA weights; SaveGatedLoraCallback then
    loads its router (which stayed as the last step left it), so the model is that checkpoint's throughout."""
    from safetensors.torch import load_file

    from gatedlora import get_router

    model = patched(GatedLoraConfig(gate="sequence", router_layer=0, straight_through=True))
    trainer = best_at_end_trainer(model, tmp_path)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best != str(tmp_path / "checkpoint-3") and trainer.state.global_step == 3
    best = tmp_path / best
    saved = load_file(best / "gatedlora_model.safetensors")
    router = get_router(model).router.state_dict()
    assert router and all(torch.equal(value, saved["gate_router." + key]) for key, value in router.items())
    state = model.state_dict()
    lora = load_file(best / "adapter_model.safetensors")
    assert all(torch.equal(state[k.replace(".weight", ".default.weight")], v) for k, v in lora.items())


def test_where_the_trainer_cannot_load_the_best_lora_the_gates_stay_with_the_last_steps_too(tmp_path):
    """PEFT saves an adapter not named "default" in a subfolder, where the Trainer does not look: it keeps the last
    step's LoRA weights, and the callback keeps the last step's gates with them (loading only the gates would mix
    two checkpoints), with a warning that says how to load the best."""
    from safetensors.torch import load_file
    from tiny_models import tiny_multi_adapter_model

    model = tiny_multi_adapter_model(layers=LAYERS, adapters={"math": (4, ["q_proj", "v_proj"])})
    patch_model(model, GatedLoraConfig(train_gate="soft"))
    trainer = best_at_end_trainer(model, tmp_path)
    with pytest.warns(UserWarning, match=r"found no LoRA weights at the top of the best checkpoint .*kept the last "
                                         r"step's; the gates and router are kept from the last step too"):
        trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best != str(tmp_path / "checkpoint-3")
    last = load_file(tmp_path / "checkpoint-3" / "gatedlora_model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k].reshape(v.shape), v) for k, v in last.items() if k.endswith("gate_weight"))
