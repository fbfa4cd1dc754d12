"""Single-pass PRISM routing: per-sequence gates decided after block router_layer, held through generate()."""
import contextlib

import pytest
import torch
from torch import nn

import gatedlora
from gatedlora import GatedLoraConfig, force_gate, get_router, patch_model
from gatedlora.patching import find_blocks, gated_layers
from steered_routers import PatternRouter, last_real_hidden, splitting_router
from tiny_models import padded_batch, randomize_lora_b, tiny_causal_lm, tiny_peft_model


def routed_by_pattern(model, inputs: dict, pattern: list[float], router_layer: int = 0, output: str = "logits"):
    """A PEFT ``model``'s ``output`` on ``inputs`` with its adapter off and on, then patched with sequence gates
    whose router opens sequence i with probability ``pattern[i]``: returns (routed, base, lora)."""

    with torch.no_grad():
        with model.disable_adapter():
            base = getattr(model(**inputs), output)
        lora = getattr(model(**inputs), output)
    router = PatternRouter(model.get_base_model().config.get_text_config().hidden_size)
    router.pattern = torch.tensor(pattern)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=router_layer, router=router))
    with torch.no_grad():
        return getattr(model(**inputs), output), base, lora


def assert_routed_as_pattern(routed, base, lora, pattern: list[float]) -> None:
    """Sequences below 0.5 are the base model bitwise, the others PEFT's (and not the base model's)."""
    closed = [i for i, p in enumerate(pattern) if p < 0.5]
    opened = [i for i, p in enumerate(pattern) if p >= 0.5]
    assert torch.equal(routed[closed], base[closed]) and not torch.equal(routed[opened[0]], base[opened[0]])
    torch.testing.assert_close(routed[opened], lora[opened], rtol=0, atol=1e-5)

LAYERS = 4
ROUTER_LAYER = 1


def prism_setup(arch="llama", side="left", want_open=(True, False, False, True)):
    model = tiny_peft_model(arch, layers=LAYERS, layers_to_transform=list(range(ROUTER_LAYER + 1, LAYERS)))
    ids, mask = padded_batch([7, 4, 9, 5], 9, side=side)
    want_open = list(want_open)
    router = splitting_router(model, [(ids, mask, want_open)], ROUTER_LAYER)
    with torch.no_grad():
        peft = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
    return model, ids, mask, torch.tensor(want_open), router, peft, base


@pytest.mark.parametrize("arch,side", [("llama", "left"), ("llama", "right"), ("qwen2", "left")])
def test_one_pass_routing_matches_base_and_peft_per_sequence(arch, side):
    model, ids, mask, want_open, router, peft, base = prism_setup(arch, side)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(get_router(model).last_decisions, want_open)
    assert get_router(model).last_probabilities.shape == (4,)
    assert torch.equal(logits[~want_open], base[~want_open])  # closed sequences: the base model, bitwise
    assert (logits[want_open] - peft[want_open]).abs().max() < 1e-5
    assert (logits[want_open] - base[want_open]).abs().max() > 1e-3


@pytest.mark.parametrize("want_open,span", [((False, True, True, False), (1, 3)), ((True, False, False, False), (0, 1)),
                                             ((False, True, True, True), (1, 4)), ((True, False, True, False), None)])
def test_open_sequences_in_one_slice_of_the_batch_match_base_and_peft_at_prefill_and_decode(want_open, span):
    """Where the open sequences are one slice of the batch the layers add plain LoRA to that slice (views,
    no gate); elsewhere the gate decides. Either way closed sequences are the base model bit for bit."""
    model, ids, mask, want, router, _, _ = prism_setup(want_open=want_open)
    step = torch.full((4, 1), 5)
    step_mask = torch.cat([mask, torch.ones_like(step)], 1)
    with torch.no_grad():
        want_logits = []
        for adapter in (True, False):  # PEFT with the adapter on every sequence, then the base model
            with contextlib.ExitStack() as stack:
                if not adapter:
                    stack.enter_context(model.disable_adapter())
                out = model(input_ids=ids, attention_mask=mask, use_cache=True)
                decode = model(input_ids=step, attention_mask=step_mask, past_key_values=out.past_key_values)
                want_logits.append((out.logits, decode.logits))
        patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        assert get_router(model).routes_of(out).open_span == span
        decode = model(input_ids=step, attention_mask=step_mask, past_key_values=out.past_key_values)
    for got, peft, base in zip((out.logits, decode.logits), *want_logits):
        assert torch.equal(got[~want], base[~want])
        assert (got[want] - peft[want]).abs().max() < 1e-5
        assert (got[want] - base[want]).abs().max() > 1e-3


def test_scattered_sequences_at_decode_keep_closed_rows_bitwise_with_inf_in_them():
    """Open sequences that are no slice of the batch (1 and 3 of 4), a decode step: the layers zero the closed
    rows of x before plain LoRA. An inf in a closed row stays out of every row's term, and the closed rows
    keep the base layer's bits."""
    model, ids, mask, want, router, _, _ = prism_setup(want_open=(False, True, False, True))
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
    layer = next(m for m in model.modules() if isinstance(m, gatedlora.GatedLoRALinear))
    seen = {}

    def poison(module, args):
        x = args[0].clone()
        x[0] = float("inf")  # sequence 0 is closed
        return (x,) + args[1:]

    def keep(module, args, output):
        seen["x"], seen["y"] = args[0], output

    step = torch.full((4, 1), 5)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        assert get_router(model).routes_of(out).open_span is None
        handles = [layer.register_forward_pre_hook(poison), layer.register_forward_hook(keep)]
        try:
            model(input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(step)], 1),
                  past_key_values=out.past_key_values)
        finally:
            for handle in handles:
                handle.remove()
        x, y = seen["x"], seen["y"]
        base = nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
        lora = layer.scaling * (x @ layer.lora_A["default"].weight.T) @ layer.lora_B["default"].weight.T
    assert torch.equal(y[~want].view(torch.int32), base[~want].view(torch.int32))  # NaN and inf bits too
    assert torch.isfinite(y[want]).all()
    assert (y[want] - (base + lora)[want]).abs().max() < 1e-5


def _generate(model, ids, mask, **kw):
    torch.manual_seed(1234)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(do_sample=True, top_k=0, temperature=1.0)])
def test_generate_holds_each_sequence_gate(mode):
    model, ids, mask, want_open, router, _, _ = prism_setup()
    with torch.no_grad():
        peft_seq, peft_scores = _generate(model, ids, mask, **mode)
        with model.disable_adapter():
            base_seq, base_scores = _generate(model, ids, mask, **mode)
        patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
        seq, scores = _generate(model, ids, mask, **mode)
    assert torch.equal(get_router(model).last_decisions, want_open)
    assert torch.equal(seq[~want_open], base_seq[~want_open])
    assert torch.equal(scores[~want_open], base_scores[~want_open])
    assert torch.equal(seq[want_open], peft_seq[want_open])
    open_scores, open_peft = scores[want_open], peft_scores[want_open]
    finite = torch.isfinite(open_peft)  # min_new_tokens masks EOS with -inf
    assert torch.equal(finite, torch.isfinite(open_scores))
    assert (open_scores[finite] - open_peft[finite]).abs().max() < 1e-5
    assert not torch.equal(peft_seq, base_seq)  # the two routes really differ


def test_beam_search_keeps_each_beams_gate():
    model, ids, mask, want_open, router, _, _ = prism_setup()
    kw = dict(num_beams=3, do_sample=False, max_new_tokens=6, pad_token_id=0)
    with torch.no_grad():
        peft_seq = model.generate(input_ids=ids, attention_mask=mask, **kw)
        with model.disable_adapter():
            base_seq = model.generate(input_ids=ids, attention_mask=mask, **kw)
        patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
        seq = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(seq[~want_open], base_seq[~want_open])
    assert torch.equal(seq[want_open], peft_seq[want_open])


def test_two_class_router_adapter_routes_by_argmax():
    model, ids, mask, want_open, linear, peft, base = prism_setup()
    net = gatedlora.prism_two_class_router(40).net
    two = nn.Sequential(nn.Linear(40, 2))
    with torch.no_grad():  # logits (0, w.h + b): argmax is class 1 exactly where the linear router opens
        two[0].weight.zero_()
        two[0].bias.zero_()
        two[0].weight[1] = linear.proj.weight[0]
        two[0].bias[1] = linear.proj.bias[0]
    assert isinstance(net[2], nn.Dropout) and net[3].out_features == 2  # PRISM's released shape
    h = last_real_hidden(model, ids, mask, ROUTER_LAYER)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER,
                                       router=gatedlora.TwoClassRouter(two)))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(get_router(model).last_decisions, two(h).argmax(-1).bool())
    assert torch.equal(get_router(model).last_decisions, want_open)
    assert torch.equal(logits[~want_open], base[~want_open])


def test_nan_router_probability_closes_the_gate():
    model, ids, mask, want_open, router, peft, base = prism_setup()

    class NanRouter(nn.Module):
        def forward(self, h):
            p = router(h).clone()
            p[0] = float("nan")
            return p

    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=NanRouter()))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert not get_router(model).last_decisions[0]
    assert torch.equal(logits[0], base[0])


def test_a_router_that_returns_logits_is_named_on_the_cpu():
    """Outside [0, 1] a router's output is not a probability (a router without its sigmoid): it would open wherever
    a logit reached the threshold. On the CPU, where reading costs nothing, that is an error naming the sequences."""
    model, ids, mask, want_open, router, peft, base = prism_setup()

    class LogitRouter(nn.Module):
        def forward(self, h):
            p = router(h).clone()
            p[1], p[-1] = 2.5, -0.25
            return p

    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=LogitRouter()))
    with pytest.raises(ValueError, match=rf"probabilities in \[0, 1\] .*got \[2.5, -0.25\] for sequences "
                                         rf"\[1, {ids.shape[0] - 1}\]; a router that returns logits needs a sigmoid"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("shape", ["[B]", "[B, 1]"])
def test_a_probability_rounded_just_above_one_opens_the_gate(shape):
    """A sum of softmax classes rounds above 1 (1.0000001 in fp32): that is a probability, not a logit, so the
    sequence opens and matches PEFT; a value past rounding (1.25) is still an error. Probabilities [B, 1] are
    checked as [B] (a check before the reshape failed on the nested list)."""
    model, ids, mask, want_open, router, peft, base = prism_setup()
    just_above = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item()
    rounded = {"value": just_above}

    class SummedRouter(nn.Module):
        def forward(self, h):
            return torch.full((h.shape[0],) + ((1,) if shape == "[B, 1]" else ()), rounded["value"])

    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=SummedRouter()))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits, peft, atol=1e-5, rtol=0)
    assert not torch.allclose(logits, base, atol=1e-3, rtol=0)
    rounded["value"] = 1.25
    with pytest.raises(ValueError, match=r"in \[0, 1\] .*got \[1.25, 1.25, 1.25, 1.25\] for sequences \[0, 1, 2, 3\]"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


def test_default_router_starts_open_and_matches_peft():
    model, ids, mask, _, _, peft, _ = prism_setup()
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER))
    assert isinstance(get_router(model).router, gatedlora.PrismRouter)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert bool(get_router(model).last_decisions.all())
    assert (logits - peft).abs().max() < 1e-5


def test_adapter_on_router_layer_is_refused_with_a_fix():
    model = tiny_peft_model("llama", layers=LAYERS)
    with pytest.raises(ValueError, match=r"LoRA covers layers at or before block 1.*"
                                         r"layers_to_transform=list\(range\(2, 4\)\)\), as PRISM does$"):
        patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER))
    # adapters from block 2 on: a router on block 1 reads none of them (it said "raise router_layer", which
    # covers more of them)
    model = tiny_peft_model("llama", layers=LAYERS, layers_to_transform=[2, 3])
    with pytest.raises(ValueError, match=r"at or before block 2.* or lower router_layer below block 2, the first"):
        patch_model(model, GatedLoraConfig(gate="sequence", router_layer=2))
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=1))


def test_lora_on_the_experts_of_a_mixture_of_experts_block_is_refused_for_sequence_gates():
    """An expert gets the rows of its tokens gathered from the whole batch ([n, K]); gates taken from row positions
    went to the wrong sequences' rows, silently where n happened to split over the batch. Token gates, which read
    each row, still patch."""
    from peft import LoraConfig, get_peft_model
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    def switch_with_lora_on_experts():
        torch.manual_seed(0)
        config = SwitchTransformersConfig(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                          num_decoder_layers=2, num_heads=4, num_experts=4, encoder_sparse_step=0,
                                          decoder_sparse_step=1, pad_token_id=0, eos_token_id=1,
                                          decoder_start_token_id=0)
        model = SwitchTransformersForConditionalGeneration(config).eval()
        targets = [n for n, m in model.named_modules()
                   if n.startswith("decoder.block.1.") and isinstance(m, torch.nn.Linear) and ".experts." in n]
        return get_peft_model(model, LoraConfig(r=2, target_modules=targets)).eval()

    with pytest.raises(ValueError, match=r"gate='sequence': LoRA covers experts of a mixture-of-experts block: "
                                         r"\['base_model.model.decoder.block.1.layer.2.mlp.experts.expert_0.wi'.*"
                                         r"gathered from the whole batch.*GatedLoraConfig\(gate='token'\)"):
        patch_model(switch_with_lora_on_experts(), GatedLoraConfig(gate="sequence", router_layer=0))
    assert any(True for _ in gated_layers(patch_model(switch_with_lora_on_experts())))


def test_layers_that_take_time_first_inputs_are_refused_for_sequence_gates():
    """Longformer's attention projections take x [T, B, K]: at T == B the per-layer shape check cannot see it, and
    every row came out wrong. Its feed-forward layers take batch-first x and are gated, exactly, even at T == B."""
    from peft import LoraConfig, get_peft_model
    from transformers import LongformerConfig, LongformerModel

    def longformer(targets):
        torch.manual_seed(0)
        config = LongformerConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=48, attention_window=[4, 4, 4], max_position_embeddings=64,
                                  pad_token_id=1)
        model = get_peft_model(LongformerModel(config, add_pooling_layer=False).eval(),
                               LoraConfig(r=4, target_modules=targets, layers_to_transform=[1, 2])).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        return model

    with pytest.raises(ValueError, match=r"gate='sequence': these layers take inputs whose rows cannot be traced.*"
                                         r"time-first \[T, B, \.\.\.\].*"
                                         r"layer.1.attention.self.(query|value).*GatedLoraConfig\(gate='token'\)"):
        patch_model(longformer(["query", "value"]), GatedLoraConfig(gate="sequence", router_layer=0))
    assert any(True for _ in gated_layers(patch_model(longformer(["query", "value"]))))

    ids = torch.randint(3, 64, (4, 4), generator=torch.Generator().manual_seed(2))  # T == B
    pattern = [0.9, 0.1, 0.1, 0.9]
    assert_routed_as_pattern(*routed_by_pattern(longformer(["intermediate.dense", "output.dense"]),
                                                dict(input_ids=ids), pattern, output="last_hidden_state"), pattern)


@pytest.mark.parametrize("share_att_key", [True, False])
def test_deberta_projections_of_the_shared_relative_embeddings_are_refused_at_patch_time(share_att_key):
    """DeBERTa's disentangled attention projects the relative-position embeddings, one input for the whole batch:
    with share_att_key through query_proj and key_proj, otherwise through pos_key_proj and pos_query_proj. Those
    layers are refused when patched (a batch of two failed at its first forward, and a batch of one ran); the
    value projection, and the query one without share_att_key, take each sequence's rows and gate exactly."""
    from peft import LoraConfig, get_peft_model
    from transformers import DebertaV2Config, DebertaV2Model

    def deberta(targets):
        torch.manual_seed(0)
        config = DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=64, relative_attention=True,
                                 position_buckets=8, share_att_key=share_att_key, pos_att_type=["p2c", "c2p"],
                                 max_relative_positions=-1, position_biased_input=False)
        model = get_peft_model(DebertaV2Model(config).eval(),
                               LoraConfig(r=4, target_modules=targets, layers_to_transform=[1, 2])).eval()
        randomize_lora_b(model, seed=1, scale=0.5)
        return model

    shared = ["query_proj", "key_proj"] if share_att_key else ["pos_key_proj", "pos_query_proj"]
    with pytest.raises(ValueError, match=r"rows cannot be traced.*shared by the whole batch.*"
                                         rf"layer.1.attention.self.({'|'.join(shared)})"):
        patch_model(deberta(shared), GatedLoraConfig(gate="sequence", router_layer=0))

    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    model = deberta(["value_proj"] if share_att_key else ["query_proj", "value_proj"])
    pattern = [0.9, 0.1]
    assert_routed_as_pattern(*routed_by_pattern(model, dict(input_ids=ids), pattern, output="last_hidden_state"),
                             pattern)


def test_soft_sequence_gates_below_the_threshold_scale_every_sequence():
    """hard=False: every probability below the threshold but above 0 is a gate of p on every sequence, neither all
    open nor all closed (the CPU's host facts looked for an open span among no open sequence: IndexError). The
    same probabilities under a threshold they all pass give the same logits."""
    ids, mask = padded_batch([7, 5, 9], 9, side="left", seed=4)
    logits = {}
    for threshold in (0.5, 0.2):
        model = tiny_peft_model(layers=4, layers_to_transform=[1, 2, 3])
        randomize_lora_b(model, seed=2, scale=0.5)
        router = PatternRouter(40)
        router.pattern = torch.tensor([0.3, 0.3, 0.3])
        patch_model(model, GatedLoraConfig(gate="sequence", router=router, hard=False, threshold=threshold))
        with torch.no_grad():
            logits[threshold] = model(input_ids=ids, attention_mask=mask).logits
            with force_gate(model, 0.0):
                base = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[0.5], logits[0.2], rtol=0, atol=1e-6)
    assert not torch.equal(logits[0.5], base)


def test_a_decision_refuses_rows_that_are_not_batch_first():
    """[T, B, K] (sequence first) holds T * B rows, which split over B sequences by count but not by position."""
    from gatedlora.call_state import RouteDecision

    decision = RouteDecision(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([True, False]), 0.5)
    assert decision.row_decisions(torch.randn(2, 3, 4)).tolist() == [True] * 3 + [False] * 3
    assert decision.row_decisions(torch.randn(6, 4)).tolist() == [True] * 3 + [False] * 3  # [B * T, K]
    with pytest.raises(RuntimeError, match=r"x of shape \[3, 2, 4\] \(6 rows\), which does not split over the 2 "
                                           r"sequences.*batch first"):
        decision.row_decisions(torch.randn(3, 2, 4))


def test_a_hybrid_model_whose_block_list_mixes_block_types_routes_per_sequence():
    """Jamba's model.layers alternates Mamba and attention blocks: the block list is the one num_hidden_layers
    long (it was not found before, and in Zamba2 a list inside one block was taken for it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(0)
    config = JambaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                         expert_layer_period=100, expert_layer_offset=99, num_experts=1, mamba_d_state=4,
                         mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, pad_token_id=0, use_mamba_kernels=False)
    model = get_peft_model(JambaForCausalLM(config).eval(), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "out_proj"], layers_to_transform=[2, 3])).eval()
    randomize = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=randomize) * 0.5)
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(2))
    pattern = [0.9, 0.1, 0.9]
    assert_routed_as_pattern(*routed_by_pattern(model, dict(input_ids=ids), pattern, router_layer=1), pattern)
    assert find_blocks(model)[0] == "base_model.model.model.layers"


def test_an_encoder_decoder_of_unequal_depths_routes_in_its_decoder():
    """num_hidden_layers is the encoder's depth in BART-like configs: the decoder's block list is the one of the
    decoder's depth (the encoder's was taken, and LoRA in the decoder was refused as outside the blocks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    model = get_peft_model(BartForConditionalGeneration(config).eval(), LoraConfig(
        r=4, target_modules=r".*decoder\.layers\.[12]\..*(q_proj|v_proj)")).eval()
    randomize = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=randomize) * 0.5)
    data = torch.Generator().manual_seed(2)
    ids, decoder_ids = torch.randint(3, 64, (3, 7), generator=data), torch.randint(3, 64, (3, 5), generator=data)
    pattern = [0.9, 0.1, 0.9]
    assert_routed_as_pattern(*routed_by_pattern(model, dict(input_ids=ids, decoder_input_ids=decoder_ids), pattern),
                             pattern)
    assert find_blocks(model)[0] == "base_model.model.model.decoder.layers"


def test_a_vision_language_model_routes_in_its_language_model_with_the_default_router():
    """A Llava's top config has neither num_hidden_layers nor hidden_size: the blocks and the default router's
    width come from its text config (the default router was refused for want of hidden_size)."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=16, patch_size=8, projection_dim=32)
    llava = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=99))
    model = get_peft_model(llava.eval(), LoraConfig(
        r=4, target_modules=r".*language_model.*layers\.[12]\..*(q_proj|v_proj)")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ids, mask = padded_batch([6, 9, 8], 9, vocab=98)
    with torch.no_grad():
        lora = model(input_ids=ids, attention_mask=mask).logits
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0))  # the default router: every sequence open
    assert find_blocks(model)[0] == "base_model.model.model.language_model.layers"
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert bool(get_router(model).last_decisions.all())
    torch.testing.assert_close(got, lora, rtol=0, atol=1e-5)


def test_blip2_routes_in_its_language_model_not_its_equally_deep_q_former():
    """Blip-2's Q-Former can be as deep as its language model, and larger: of the lists as deep as the text decoder,
    the one in the module whose config is the text config holds the blocks (the Q-Former's were taken)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                              OPTConfig)

    torch.manual_seed(0)
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                               image_size=16, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                 encoder_hidden_size=32, vocab_size=50)
    text = OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=4, image_token_index=99)
    model = get_peft_model(Blip2ForConditionalGeneration(config).eval(), LoraConfig(
        r=4, target_modules=r".*language_model.*layers\.[12]\..*(q_proj|v_proj)")).eval()
    randomize_lora_b(model, seed=1, scale=0.3)
    ids, mask = padded_batch([6, 9, 8], 9, vocab=98)
    inputs = dict(input_ids=torch.cat([torch.full((3, 4), 99), ids.clamp(min=2)], 1),
                  attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1),
                  pixel_values=torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    pattern = [0.9, 0.1, 0.9]
    assert_routed_as_pattern(*routed_by_pattern(model, inputs, pattern), pattern)
    assert find_blocks(model)[0] == "base_model.model.language_model.model.decoder.layers"


def test_a_composite_encoder_decoder_routes_in_its_decoder():
    """t5gemma2's top config is an encoder-decoder whose text config is its decoder's, as deep as the encoder's
    text model: the blocks are the list under "decoder" (the encoder's were taken)."""
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration

    with torch.device("meta"):
        model = T5Gemma2ForConditionalGeneration(T5Gemma2Config())
    path, blocks = find_blocks(model)
    decoder_depth = T5Gemma2Config().get_text_config(decoder=True).num_hidden_layers
    assert path == "model.decoder.layers" and len(blocks) == decoder_depth


def test_fresh_sequence_adapter_only_after_router_layer():
    model = tiny_causal_lm("llama", layers=LAYERS)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, target_modules=["q_proj"]))
    path, blocks = find_blocks(model)
    assert path == "model.layers"
    kinds = [type(b.self_attn.q_proj).__name__ for b in blocks]
    assert kinds == ["Linear", "Linear", "GatedLoRALinear", "GatedLoRALinear"]


def test_gated_layer_outside_a_forward_needs_a_decision():
    model, ids, mask, _, router, _, _ = prism_setup()
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
    layer = model.base_model.model.model.layers[3].mlp.up_proj
    with pytest.raises(RuntimeError, match="sequence gate not decided yet"):
        layer(torch.randn(2, 3, 40))


def test_get_router_needs_sequence_mode():
    model = tiny_peft_model("llama")
    patch_model(model)
    with pytest.raises(ValueError, match="patched with gate='token'; routers exist only with gate='sequence'"):
        get_router(model)


def test_all_closed_batch_is_the_base_model_and_skips_the_adapter(monkeypatch):
    model = tiny_peft_model("llama", layers=LAYERS, layers_to_transform=list(range(ROUTER_LAYER + 1, LAYERS)))
    ids, mask = padded_batch([7, 4, 9], 9)
    router = splitting_router(model, [(ids, mask, [False, False, False])], ROUTER_LAYER)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
    calls = []
    monkeypatch.setattr(gatedlora.layers, "gated_lora", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits, base) and calls == []  # the host knew: no adapter call at all


def test_a_deep_copy_routes_itself_and_unpatches_alone():
    import copy

    model, ids, mask, want_open, router, peft, base = prism_setup()
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
    with torch.no_grad():
        model(input_ids=ids[:2], attention_mask=mask[:2])
        twin = copy.deepcopy(model)  # as TRL's reference models are made
        logits = twin(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(get_router(twin).last_decisions, want_open)  # the copy's own decision, this batch
    assert torch.equal(logits[~want_open], base[~want_open])
    gatedlora.unpatch_model(twin)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits[~want_open], base[~want_open])
    assert torch.equal(get_router(model).last_decisions, want_open)  # the original still routes


def test_soft_routing_with_hard_training_gates_keeps_closed_rows_closed():
    model, ids, mask, want_open, router, peft, base = prism_setup()

    class Fixed(nn.Module):
        def forward(self, h):  # 0.2 is open under soft gates, closed under hard ones
            return torch.where(torch.tensor(want_open), 0.9, 0.2).to(h)

    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=Fixed(), hard=False,
                                       train_gate="hard"))
    model.train()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits[~want_open], base[~want_open])
    assert (logits[want_open] - peft[want_open]).abs().max() < 1e-5


def test_unpatch_puts_the_backbone_forward_and_generate_back_and_signatures_stay_visible():
    import inspect

    model, ids, mask, want_open, router, peft, base = prism_setup()
    hf = model.base_model.model
    before = inspect.signature(hf.model.forward)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=ROUTER_LAYER, router=router))
    assert "forward" in hf.model.__dict__ and "generate" in hf.__dict__
    assert inspect.signature(hf.model.forward) == before  # what transformers' Trainer and generate inspect
    gatedlora.unpatch_model(model)
    assert "forward" not in hf.model.__dict__ and "generate" not in hf.__dict__
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, peft)


def test_a_router_of_another_width_is_named_with_what_it_was_given():
    """A router built for another hidden size fails inside its own matmul: the error says it was the router, on
    which block's hidden states, and their shape, beside torch's own message."""
    model = tiny_peft_model("llama", layers_to_transform=[1, 2])
    hidden = model.get_base_model().config.hidden_size
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, router=nn.Linear(hidden + 3, 1)))
    ids, mask = padded_batch([5, 8], 8)
    with pytest.raises(RuntimeError, match=rf"the router failed on the hidden states after block 0, \[B, H\] = "
                                           rf"\[2, {hidden}\] \(torch.float32\): .*"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


def test_a_bf16_prism_router_decides_on_its_logit_not_on_p_rounded_to_bf16():
    """A bf16 router (patch_model builds the default one in the model's dtype) with a logit just below 0 gives
    p = 0.49975 in fp32, which bf16 rounds to 0.5: its probability comes back in fp32, so the sequence stays
    closed at threshold 0.5, as the same router in fp32 decides."""
    router = gatedlora.PrismRouter(8, start_open=False).to(torch.bfloat16)
    with torch.no_grad():
        router.net[-1].weight.zero_()
        router.net[-1].bias.fill_(-0.001)
    p = router(torch.randn(3, 8, dtype=torch.bfloat16))
    assert p.dtype == torch.float32 and bool((p < 0.5).all())
    assert torch.sigmoid(torch.tensor(-0.001, dtype=torch.bfloat16)).item() == 0.5  # what bf16 would have given


@pytest.mark.slow  # (continuous batching's manager takes about 18 s to start and stop here)
def test_continuous_batching_is_refused_per_request_with_the_reason():
    """Transformers' continuous batching (generate_batch, cache_implementation="paged") packs every request into one
    row: the router saw the whole pack as one sequence and routed every request by the last packed token, the route
    changing at each step. Each request now fails with the reason (continuous batching reports a forward's error
    per request)."""
    from transformers import GenerationConfig

    model = patch_model(tiny_peft_model("llama", layers_to_transform=[1, 2]), GatedLoraConfig(gate="sequence"))
    if not hasattr(model, "generate_batch"):
        pytest.skip("this transformers has no continuous batching")
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        results = model.generate_batch(inputs=[[5, 6, 7], [8, 9]], generation_config=config)
    assert len(results) == 2
    for result in results.values():
        assert result.generated_tokens == [] and "cannot run with a PagedAttentionCache (continuous batching" in \
            str(result.error)
