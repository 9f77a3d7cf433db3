"""The dedicated-GPU backend (starsql.serve.fast): the static-cache, CUDA-graph decoder (on a CPU: the same loop,
no graph), q/k/v fused into one projection, and the backend that serves greedy answers through them."""

import pytest

from starsql.prompt import build_prompt
from starsql.serve.decode import stream_sql
from starsql.serve.fast import FastDecodeBackend
from starsql.serve.fast.decoder import GreedyDecoder
from starsql.serve.fast.fused_qkv import FusedQKVAttention, fuse_qkv_projections, grouped_query_attention
from starsql.serve.load import load_for_inference

PROMPTS = [
    build_prompt("CREATE TABLE singer (name VARCHAR, age INTEGER, country VARCHAR)", "Names of singers older than 30?"),
    build_prompt("CREATE TABLE a (x INTEGER)", "How many rows?"),
    build_prompt("CREATE TABLE employee (name VARCHAR, salary INTEGER)", "Who earns the most?",
                 history=[("How many employees?", "SELECT count(*) FROM employee")]),
]


def plain_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    import torch

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tuned(tiny_run):
    """The trained tiny model as the fast backend serves it: adapter merged, then q/k/v fused."""
    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    fuse_qkv_projections(model)
    return model, tokenizer


def backend(tuned, max_length: int = 512) -> FastDecodeBackend:
    model, tokenizer = tuned
    return FastDecodeBackend(model, tokenizer, GreedyDecoder(model, max_length=max_length, compile=False))


def chaotic_unfused():
    """The tiny model, q/k/v unfused, with large random weights (seed 0): far from ties, every weight matters."""
    import torch

    model, tokenizer = load_for_inference("tiny-starcoder2")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model, tokenizer


@pytest.fixture(scope="module")
def chaotic(tiny_model_path):
    """The tiny model with large random weights: its output depends on every prompt token and
    position (the trained tiny model answers everything alike), and its logits are far from ties.
    Randomised before q/k/v are fused, so the draws (and the chaos) do not depend on the fusion."""
    model, tokenizer = chaotic_unfused()
    fuse_qkv_projections(model)  # as the fast backend serves it
    return model, tokenizer


@pytest.mark.parametrize("window", [None, 4096], ids=["full-attention", "sliding-window"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_decoder_tokens_identical_to_plain_generate(chaotic, compiled, window, monkeypatch):
    import torch._dynamo

    model, tokenizer = chaotic
    monkeypatch.setattr(model.config, "sliding_window", window)  # StarCoder2-3B's is 4096
    decoder = GreedyDecoder(model, max_length=512, compile=compiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    seen = set()
    for prompt in PROMPTS * 2:  # twice: the cache is reset between requests
        expected = plain_greedy(model, tokenizer, prompt, 48)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        got = list(decoder.tokens(ids, 48, tokenizer.eos_token_id))
        assert got == expected
        seen.add(tuple(got))
    assert len(seen) == len(PROMPTS)  # the prompts lead to different outputs: a stale cache would show
    # One compiled graph for every step of every request: a recompile per position would be unusable.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == (1 if compiled else 0)


def test_decoder_control_a_wrong_position_changes_the_output(chaotic):
    # The control for the test above: feeding each step one position late must be caught by it.
    model, tokenizer = chaotic
    decoder = GreedyDecoder(model, max_length=512, compile=False)
    start = decoder._start
    decoder._start = lambda slot, token, position: start(slot, token, position + 1)
    ids = tokenizer(PROMPTS[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert list(decoder.tokens(ids, 48, tokenizer.eos_token_id)) != plain_greedy(model, tokenizer, PROMPTS[0], 48)


@pytest.mark.parametrize("window", [None, 4096], ids=["full-attention", "sliding-window"])
@pytest.mark.parametrize("bucket", [16, 64])
def test_a_prompt_padded_to_its_prefill_width_decodes_as_plain_generate(chaotic, bucket, window, monkeypatch):
    # On a GPU the prompt is right-padded to a multiple of prefill_bucket, so that one CUDA graph serves
    # every prompt of that width; the padding (its K/V past the prompt, the cache's counter) must change
    # nothing. Bucket 64 is wider than the short cache: the prompt is padded to the cache's end.
    model, tokenizer = chaotic
    monkeypatch.setattr(model.config, "sliding_window", window)  # StarCoder2-3B's is 4096
    ids = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in PROMPTS]
    decoder = GreedyDecoder(model, max_length=512, compile=False, lengths=(ids[1].shape[1] + 24,), prefill_bucket=bucket)
    decoder._pad_prefill = True  # the GPU default
    widths = []
    forward = decoder._prefill_forward
    decoder._prefill_forward = lambda slot, width: (widths.append((width, slot.length)), forward(slot, width))[1]
    for prompt, prompt_ids in zip(PROMPTS, ids):
        for new_tokens in (24, 48):  # the short cache, then the 512 one
            decoder.warm_up()
            widths.clear()
            got = list(decoder.tokens(prompt_ids, new_tokens, tokenizer.eos_token_id))
            assert got == plain_greedy(model, tokenizer, prompt, new_tokens)
            (width, cache_length), = widths
            assert width == min(cache_length, -(-prompt_ids.shape[1] // bucket) * bucket)
            if new_tokens == 24 and prompt is PROMPTS[1]:
                assert width > prompt_ids.shape[1]  # padded: the check above saw padding


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
def test_prefill_graphs_replay_the_eager_prefill_on_a_gpu(chaotic):
    # On a GPU: one prefill graph per padded width, captured on first use and replayed after, across
    # cache lengths and requests; the tokens those give are the eager prefill's.
    import copy

    model, tokenizer = chaotic
    model = copy.deepcopy(model).to("cuda")
    graphed = GreedyDecoder(model, max_length=512, compile=False, lengths=(64,), prefill_bucket=16)
    eager = GreedyDecoder(model, max_length=512, compile=False, lengths=(64,), prefill_bucket=16)
    eager._graph_prefill = False
    for prompt in PROMPTS * 2:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].cuda()
        for new_tokens in (8, 40):
            assert list(graphed.tokens(ids, new_tokens)) == list(eager.tokens(ids, new_tokens))
    assert graphed._graph_prefill and all(slot.prefill_graphs for slot in graphed.caches)
    assert not any(slot.prefill_graphs for slot in eager.caches)


def test_decoder_queues_the_next_step_before_the_host_reads_a_token(chaotic):
    # The GPU must not wait for Python between tokens: when token i reaches the caller, the step for
    # token i + 1 is already queued; and none is queued past max_new_tokens (the cache's last position).
    # (On a CPU nothing runs beside Python, so the decoder queues ahead only on a GPU; here it is made to.)
    model, tokenizer = chaotic
    ids = tokenizer(PROMPTS[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    for ahead in (True, False):
        decoder = GreedyDecoder(model, max_length=512, compile=False)
        assert decoder._queue_ahead is False  # the CPU default
        decoder._queue_ahead = ahead
        decoder.warm_up()  # its warm-up steps are not the request's
        steps = []
        advance = decoder._advance
        decoder._advance = lambda slot: (steps.append(1), advance(slot))[1]
        queued_when_read = [len(steps) for _ in decoder.tokens(ids, 20, eos_token_id=None)]
        assert queued_when_read == ([i + 1 for i in range(19)] + [19] if ahead else list(range(20)))
        assert len(steps) == 19  # 19 steps after the prefill's token; none past max_new_tokens
        assert int(decoder.caches[0].position) == ids.shape[1] + 19  # the position after the last step
        assert list(decoder.tokens(ids, 20)) == plain_greedy(model, tokenizer, PROMPTS[0], 20)


def test_the_backend_streams_what_generate_streams(tuned):
    model, tokenizer = tuned
    fast = backend(tuned)
    for prompt in PROMPTS:
        *_, decoded = fast.stream(prompt, 64)
        *_, plain = stream_sql(model, tokenizer, prompt, max_new_tokens=64)
        assert decoded == plain
    assert not fast.decoder.lock.locked()


def test_the_backend_falls_back_when_the_decoder_is_busy_or_too_short_or_sampling(tuned):
    model, tokenizer = tuned
    calls = []
    fast = backend(tuned)
    tokens = fast.decoder.tokens
    fast.decoder.tokens = lambda *a, **k: (calls.append(1), (yield from tokens(*a, **k)))[1]
    *_, expected = stream_sql(model, tokenizer, PROMPTS[0], max_new_tokens=32)
    with fast.decoder.lock:  # another request holds it: this one uses generate()
        *_, busy = fast.stream(PROMPTS[0], 32)
    short = backend(tuned, max_length=16)  # prompt + answer do not fit
    short.decoder.tokens = fast.decoder.tokens
    *_, long_prompt = short.stream(PROMPTS[0], 32)
    sampled = list(fast.stream(PROMPTS[0], 8, temperature=0.7))
    assert not calls  # all went to generate(): a busy decoder, a prompt that does not fit it, sampling
    assert busy == long_prompt == expected and sampled
    *_, free = fast.stream(PROMPTS[0], 32)
    assert free == expected and calls


def test_closing_a_decoder_stream_early_frees_the_decoder(tuned):
    # Gradio closes the generator on Stop or a disconnect: the next request must get the decoder.
    fast = backend(tuned)
    stream = fast.stream(PROMPTS[0], 64)
    next(stream)
    assert fast.decoder.lock.locked()
    stream.close()
    assert not fast.decoder.lock.locked()


def test_answers_queue_for_the_decoder_only_when_its_graphs_are_captured(tuned):
    fast = backend(tuned)
    fast.decoder.use_graph = True  # captured (a GPU)
    assert fast.concurrency == 1
    fast.decoder.use_graph = False  # a CPU, or the capture failed: no faster than generate(), so share the GPU
    assert fast.concurrency == fast.plain.concurrency == 2


@pytest.mark.parametrize("batch", [1, 4])
def test_a_backend_that_cannot_be_built_falls_back_to_generate(tiny_run, monkeypatch, batch):
    import starsql.serve.fast as fast_package
    from starsql.serve.decode import GenerateBackend, build_backend
    from starsql.serve.fast.batched import BatchedDecoder

    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    routed = []
    monkeypatch.setattr(fast_package, "gemv_available", lambda model: True)
    monkeypatch.setattr(fast_package, "use_gemv", lambda model, enabled=True: routed.append(enabled))

    def broken_warm_up(self):
        raise RuntimeError("Triton cannot compile this model")

    monkeypatch.setattr(GreedyDecoder if batch == 1 else BatchedDecoder, "warm_up", broken_warm_up)
    with pytest.warns(UserWarning, match="Fast decoding is off.*Triton cannot compile"):
        warming = build_backend(model, tokenizer, fast=True, batch=batch)
        chosen = warming.wait(60)  # built in a background thread
    assert type(chosen) is GenerateBackend and warming.fast is None
    assert routed[0] is True and routed[-1] is False  # the kernel was turned off again: generate() runs on cuBLAS
    prompt = build_prompt("CREATE TABLE a (x INTEGER)", "How many rows?")
    assert list(warming.stream(prompt, 16))


def test_the_fast_backend_fuses_and_decodes_what_generate_decodes(tiny_run):
    from starsql.serve.decode import build_backend

    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    *_, expected = stream_sql(model, tokenizer, PROMPTS[1], max_new_tokens=32)
    chosen = build_backend(model, tokenizer, fast=True, batch=1).wait(60)  # on a CPU: no graphs, no kernel, the same loop
    assert type(chosen) is FastDecodeBackend and all(slot.prepared for slot in chosen.decoder.caches)
    assert all(type(m) is FusedQKVAttention for m in model.modules() if "Attention" in type(m).__name__)
    *_, got = chosen.stream(PROMPTS[1], 32)
    assert got == expected


def test_zero_new_tokens_yield_nothing_at_once(tuned):
    model, tokenizer = tuned
    ids = tokenizer(PROMPTS[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert list(GreedyDecoder(model, max_length=512, compile=False).tokens(ids, 0)) == []
    assert list(stream_sql(model, tokenizer, PROMPTS[0], max_new_tokens=0)) == []  # generate() would wait 300 s
    assert list(backend(tuned).stream(PROMPTS[0], 0)) == []


def test_decoder_rejects_a_prompt_longer_than_its_cache(tuned):
    model, tokenizer = tuned
    ids = tokenizer(PROMPTS[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="max_length"):
        next(GreedyDecoder(model, max_length=16, compile=False).tokens(ids, 8))


def test_warm_up_prepares_once_and_the_next_request_is_unchanged(chaotic, monkeypatch):
    model, tokenizer = chaotic
    monkeypatch.setattr(model.config, "sliding_window", 4096)
    decoder = GreedyDecoder(model, max_length=8192, compile=False)
    assert decoder.max_length == 4096  # never past the model's window: longer requests use generate()
    decoder.warm_up()
    assert [slot.length for slot in decoder.caches] == [512, 1024, 2048, 4096]
    assert all(slot.prepared for slot in decoder.caches) and not decoder.lock.locked()
    ids = tokenizer(PROMPTS[1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert list(decoder.tokens(ids, 32, tokenizer.eos_token_id)) == plain_greedy(model, tokenizer, PROMPTS[1], 32)


def test_short_requests_use_the_short_cache_and_all_match_plain_generate(chaotic):
    # Every token attends over the whole static cache: a 300-token request must not pay for 4,096.
    import torch._dynamo

    model, tokenizer = chaotic
    decoder = GreedyDecoder(model, max_length=200, compile=True, lengths=(48,))
    assert [slot.length for slot in decoder.caches] == [48, 200]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ids = tokenizer(PROMPTS[1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    fits = 48 - ids.shape[1]
    assert 0 < fits < 40, "the test needs a prompt that leaves room in the short cache"
    short = list(decoder.tokens(ids, fits, tokenizer.eos_token_id))
    assert decoder.caches[0].prepared and not decoder.caches[1].prepared
    long = list(decoder.tokens(ids, 40, tokenizer.eos_token_id))  # does not fit 48 positions: the 200 cache
    assert decoder.caches[1].prepared
    expected = plain_greedy(model, tokenizer, PROMPTS[1], 40)
    assert long == expected and short == expected[:fits]
    assert decoder.cache_length(ids.shape[1] + 40) == 200 and decoder.cache_length(ids.shape[1] + fits) == 48
    assert list(decoder.tokens(ids, fits, tokenizer.eos_token_id)) == short
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2  # one per length, no more


def test_more_cache_lengths_than_the_compile_limit_still_compile(chaotic, monkeypatch):
    # Each length is one more compile of the shared step; with fullgraph, going past the limit raises.
    import torch._dynamo

    model, tokenizer = chaotic
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # PyTorch's default
    lengths = tuple(range(40, 136, 12))  # 8 lengths + max_length: 9 compiles
    decoder = GreedyDecoder(model, max_length=136, compile=True, lengths=lengths)
    decoder.warm_up()
    ids = tokenizer(PROMPTS[1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert list(decoder.tokens(ids, 100 - ids.shape[1], tokenizer.eos_token_id)) == plain_greedy(model, tokenizer, PROMPTS[1], 100 - ids.shape[1])


# --- q/k/v fused into one projection (the fast backend's model) ---


def test_fused_qkv_computes_what_the_three_projections_did(tiny_model_path, monkeypatch):
    import torch

    model, tokenizer = chaotic_unfused()
    ids = tokenizer(PROMPTS[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    expected = [plain_greedy(model, tokenizer, prompt, 32) for prompt in PROMPTS]
    parameters = sum(p.numel() for p in model.parameters())

    assert fuse_qkv_projections(model) == model.config.num_hidden_layers
    import starsql.serve.fast.fused_qkv as fused_qkv

    grouped = fused_qkv.grouped_query_attention
    calls = []
    monkeypatch.setattr(fused_qkv, "grouped_query_attention", lambda *a, **k: (calls.append(1), grouped(*a, **k))[1])
    attention = model.model.layers[0].self_attn
    assert type(attention) is FusedQKVAttention and not hasattr(attention, "q_proj")
    assert sum(p.numel() for p in model.parameters()) == parameters  # moved, not copied
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, logits, atol=1e-5)
    assert [plain_greedy(model, tokenizer, prompt, 32) for prompt in PROMPTS] == expected
    decoder = GreedyDecoder(model, max_length=512, compile=False)
    for prompt, tokens in zip(PROMPTS, expected):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        assert list(decoder.tokens(ids, 32, tokenizer.eos_token_id)) == tokens
    # The fused model decoded every new token (generate() and the decoder) through grouped_query_attention.
    assert len(calls) >= 2 * len(PROMPTS) * model.config.num_hidden_layers  # each layer, each prompt, both paths
    assert fuse_qkv_projections(model) == 0  # already fused


@pytest.mark.parametrize("mask_kind", ["none", "boolean", "additive"])
@pytest.mark.parametrize("q_len", [1, 3])
def test_grouped_query_attention_is_sdpa_over_repeated_heads(mask_kind, q_len):
    # The decoding attention of the fused model: each query head h attends with K/V head h // groups,
    # as transformers' repeat_kv orders them, under every mask form transformers passes.
    import torch

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 6, q_len, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    visible = torch.rand(2, 1, q_len, 12) > 0.4  # longer than K/V, as a static cache's mask may be
    visible[..., 9] = True  # every query sees at least one key
    mask = {"none": None, "boolean": visible,
            "additive": torch.where(visible, 0.0, torch.finfo(torch.float32).min)}[mask_kind]  # fmt: skip
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
        attn_mask=None if mask is None else mask[..., :10], scale=0.3,
    ).transpose(1, 2)  # fmt: skip
    got = grouped_query_attention(query, key, value, mask, scaling=0.3)
    assert got.shape == (2, q_len, 6, 8)
    assert torch.allclose(got, expected, atol=1e-5)


def test_fused_qkv_control_swapped_key_and_value_weights_change_the_output(tiny_model_path):
    # The control for the test above: a fused weight stacked in the wrong order must be caught by it.
    import torch

    model, tokenizer = chaotic_unfused()
    ids = tokenizer(PROMPTS[0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
        fuse_qkv_projections(model)
        for layer in model.model.layers:
            attention = layer.self_attn
            q, k, v = attention.qkv_proj.weight.split(attention.qkv_sizes)
            attention.qkv_proj.weight.copy_(torch.cat([q, v, k]))
        assert not torch.allclose(model(ids).logits, logits, atol=1e-3)


def test_a_4bit_model_keeps_its_projections(tiny_model_path):
    model, _ = load_for_inference("tiny-starcoder2", load_in_4bit=True)
    assert fuse_qkv_projections(model) == 0
    assert not any(isinstance(module, FusedQKVAttention) for module in model.modules())
    assert hasattr(model.model.layers[0].self_attn, "q_proj")
