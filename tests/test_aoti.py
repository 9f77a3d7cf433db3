"""The ahead-of-time compiled decoder (starsql.serve.fast.aoti): the forward over a static cache exported once, the
number of tokens dynamic, compiled by AOTInductor into a package that a restart loads without compiling; it decodes
exactly plain generate()'s greedy tokens (fp32, CPU), and the backend over it falls back to generate() where it
should. The program is compiled once for the whole file (about a minute on a CPU)."""

import time

import pytest
import torch

from starsql.serve.decode import stream_sql
from starsql.serve.fast import aoti
from starsql.serve.fast.aoti import (AotiDecodeBackend, AotiDecoder, build_aoti_backend, compile_decoder,
                                     export_decoder, package_key)
from starsql.serve.load import load_tokenizer
from test_fast_decode import PROMPTS, plain_greedy

CACHE = 96  # positions of the compiled cache: every prompt (28-53 tokens) + NEW fits
NEW = 40


@pytest.fixture(scope="module")
def chaotic(tiny_model_path):
    """A tiny fp32 StarCoder2 (the tiny tokenizer's vocabulary) with large random weights: its greedy output varies
    from token to token and prompt to prompt, and its logits are far from ties. Sliding window as StarCoder2-3B's."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    tokenizer = load_tokenizer("tiny-starcoder2")
    config = Starcoder2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                              sliding_window=4096, use_bias=True, tie_word_embeddings=True,
                              bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = Starcoder2ForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 1.0)
    return model, tokenizer


@pytest.fixture(scope="module")
def compiled(chaotic, tmp_path_factory):
    """The exported program, compiled once into cache_dir/<package_key>.pt2, and a decoder over it."""
    model, tokenizer = chaotic
    cache_dir = tmp_path_factory.mktemp("aoti-packages")
    package = cache_dir / "packages" / f"{package_key(model, CACHE)}.pt2"  # its folder does not exist yet
    started = time.perf_counter()
    exported = export_decoder(model, CACHE)
    exported_s = time.perf_counter() - started
    step = compile_decoder(exported, package_path=package)
    compiled_s = time.perf_counter() - started - exported_s
    print(f"\nAOTI on this CPU: export {exported_s:.1f} s, compile and load {compiled_s:.1f} s")
    return dict(model=model, tokenizer=tokenizer, exported=exported, package=package, step=step,
                decoder=AotiDecoder(step, CACHE, model.device))  # fmt: skip


def ids_of(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_tokens_identical_to_plain_generate_in_either_order(compiled):
    model, tokenizer, step = compiled["model"], compiled["tokenizer"], compiled["step"]
    expected = {prompt: plain_greedy(model, tokenizer, prompt, NEW) for prompt in PROMPTS}
    assert all(len(set(tokens)) >= 3 for tokens in expected.values())  # varied: a wrong step would show
    assert len({tuple(tokens) for tokens in expected.values()}) == len(PROMPTS)  # and a stale cache too
    calls = []
    spy = lambda **inputs: (calls.append(inputs["input_ids"].shape[-1]), step(**inputs))[1]  # noqa: E731
    decoder = AotiDecoder(spy, CACHE, model.device)
    # Longest last, then first: a shorter prompt after a longer one finds the longer one's K/V past its position.
    lengths = [ids_of(tokenizer, p).shape[-1] for p in PROMPTS]
    for prompt in sorted(PROMPTS, key=len) + sorted(PROMPTS, key=len, reverse=True):
        calls.clear()
        assert list(decoder.tokens(ids_of(tokenizer, prompt), NEW, tokenizer.eos_token_id)) == expected[prompt]
        # The prompt in one call (the token count is dynamic), then one call a token.
        assert calls == [ids_of(tokenizer, prompt).shape[-1]] + [1] * (NEW - 1)
    assert len(set(lengths)) == len(PROMPTS)


def test_max_new_tokens_and_eos_are_respected(compiled):
    model, tokenizer, decoder = compiled["model"], compiled["tokenizer"], compiled["decoder"]
    ids = ids_of(tokenizer, PROMPTS[1])
    expected = plain_greedy(model, tokenizer, PROMPTS[1], NEW)
    assert list(decoder.tokens(ids, 5, tokenizer.eos_token_id)) == expected[:5]
    assert list(decoder.tokens(ids, 0, tokenizer.eos_token_id)) == []
    # A token the model makes, taken as EOS: decoding stops at its first occurrence, which it yields.
    stop = next(index for index, token in enumerate(expected) if index >= 2 and token not in expected[:index])
    assert list(decoder.tokens(ids, NEW, expected[stop])) == expected[: stop + 1]
    with pytest.raises(ValueError, match="exceed the decoder's max_length"):
        list(decoder.tokens(ids, CACHE, tokenizer.eos_token_id))


def test_the_backend_streams_what_generate_streams(compiled):
    model, tokenizer = compiled["model"], compiled["tokenizer"]
    backend = AotiDecodeBackend(model, tokenizer, compiled["decoder"])
    assert backend.concurrency == 1
    for prompt in PROMPTS:
        *_, decoded = backend.stream(prompt, NEW)
        *_, plain = stream_sql(model, tokenizer, prompt, max_new_tokens=NEW)
        assert decoded == plain
    assert not backend.decoder.lock.locked()
    assert list(backend.stream(PROMPTS[0], 0)) == []


def test_the_backend_falls_back_when_sampling_too_long_or_busy(compiled):
    model, tokenizer = compiled["model"], compiled["tokenizer"]
    decoder = AotiDecoder(compiled["step"], CACHE, model.device)
    calls = []
    tokens = decoder.tokens
    decoder.tokens = lambda *a, **k: (calls.append(1), (yield from tokens(*a, **k)))[1]
    backend = AotiDecodeBackend(model, tokenizer, decoder)
    long_prompt = "".join(PROMPTS)  # longer than the cache
    assert ids_of(tokenizer, long_prompt).shape[-1] > CACHE
    *_, long_expected = stream_sql(model, tokenizer, long_prompt, max_new_tokens=8)
    *_, long_got = backend.stream(long_prompt, 8)
    sampled = list(backend.stream(PROMPTS[0], 8, temperature=0.7))
    *_, expected = stream_sql(model, tokenizer, PROMPTS[0], max_new_tokens=NEW)
    with backend.decoder.lock:  # another request holds it: this one uses generate()
        *_, busy = backend.stream(PROMPTS[0], NEW)
    assert not calls  # all went to generate(): a prompt longer than the cache, sampling, a busy decoder
    assert long_got == long_expected and sampled and busy == expected
    *_, free = backend.stream(PROMPTS[0], NEW)
    assert free == expected and calls


def test_an_existing_package_loads_without_compiling(compiled, monkeypatch):
    model, tokenizer = compiled["model"], compiled["tokenizer"]

    def refuse(*args, **kwargs):
        raise AssertionError("compiled again, though the package exists")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    expected = plain_greedy(model, tokenizer, PROMPTS[2], NEW)
    ids = ids_of(tokenizer, PROMPTS[2])
    started = time.perf_counter()
    step = compile_decoder(compiled["exported"], package_path=compiled["package"])
    print(f"\nAOTI package loaded in {time.perf_counter() - started:.2f} s")
    assert list(AotiDecoder(step, CACHE, model.device).tokens(ids, NEW, tokenizer.eos_token_id)) == expected
    # The backend's restart: the package under cache_dir by its key, neither exported nor compiled again.
    monkeypatch.setattr(aoti, "export_decoder", refuse)
    backend = build_aoti_backend(model, tokenizer, max_cache_len=CACHE, cache_dir=compiled["package"].parent)
    assert list(backend.decoder.tokens(ids, NEW, tokenizer.eos_token_id)) == expected


def test_the_package_runs_the_live_weights(compiled):
    # The package holds code only: the model's weights, changed in place (an adapter merged), are what it runs.
    model, tokenizer = compiled["model"], compiled["tokenizer"]
    ids = ids_of(tokenizer, PROMPTS[0])
    weight = model.model.layers[1].mlp.c_fc.weight
    with torch.no_grad():
        weight.mul_(-1)
        try:
            expected = plain_greedy(model, tokenizer, PROMPTS[0], 12)
            assert list(compiled["decoder"].tokens(ids, 12, tokenizer.eos_token_id)) == expected
        finally:
            weight.mul_(-1)
    assert expected != plain_greedy(model, tokenizer, PROMPTS[0], 12)  # the change mattered


def test_the_package_key_follows_what_the_program_depends_on(chaotic, monkeypatch):
    import copy

    model, _ = chaotic
    key = package_key(model, CACHE)
    assert key == package_key(model, CACHE) and len(key) == 16
    assert package_key(model, CACHE + 1) != key
    assert package_key(copy.deepcopy(model).to(torch.bfloat16), CACHE) != key
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert package_key(model, CACHE) != key
    monkeypatch.undo()
    monkeypatch.setattr(model.config, "rope_theta", 1.0, raising=False)
    assert package_key(model, CACHE) != key


def test_export_without_a_sliding_window_decodes_as_generate(chaotic, monkeypatch):
    # The fixture's model has StarCoder2's sliding window; without one transformers builds another mask. The
    # exported program, run eagerly (no compile), is what AOTInductor compiles.
    model, tokenizer = chaotic
    monkeypatch.setattr(model.config, "sliding_window", None)
    decoder = AotiDecoder(export_decoder(model, CACHE).module(), CACHE, model.device)
    for prompt in (PROMPTS[2], PROMPTS[1]):
        expected = plain_greedy(model, tokenizer, prompt, 12)
        assert list(decoder.tokens(ids_of(tokenizer, prompt), 12, tokenizer.eos_token_id)) == expected


def test_the_cache_may_not_exceed_the_sliding_window(chaotic):
    model, _ = chaotic
    with pytest.raises(ValueError, match="sliding window"):
        export_decoder(model, model.config.sliding_window + 1)


def test_the_zero_gpu_path_decodes_the_same_tokens(compiled):
    model, tokenizer = compiled["model"], compiled["tokenizer"]
    try:
        step = compile_decoder(compiled["exported"], zero_gpu=True)
    except (AttributeError, ImportError) as error:
        if torch.version.cuda is not None:
            raise
        # spaces.aoti_compile imports spaces.zero.torch, which reads torch.version.cuda (None) and
        # torch._C._cuda_init, neither of which a CPU build of torch has.
        pytest.skip(f"spaces.aoti_compile cannot run with a CPU-only torch (torch.version.cuda is None): importing "
                    f"spaces.zero.torch fails with {type(error).__name__}: {error}")
    ids = ids_of(tokenizer, PROMPTS[1])
    expected = plain_greedy(model, tokenizer, PROMPTS[1], NEW)
    assert list(AotiDecoder(step, CACHE, model.device).tokens(ids, NEW, tokenizer.eos_token_id)) == expected


def test_the_fast_package_leaves_aoti_unimported():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, starsql.serve.fast; assert 'starsql.serve.fast.aoti' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
