"""Plain generate(): batched greedy SQL in input order, streaming, Stop really stopping the model, the backend."""

import threading

import pytest

from starsql.serve.decode import USAGE, GenerateBackend, build_backend, generate_sql, statement_finished, stream_sql
from starsql.serve.load import load_for_inference
from starsql.prompt import build_prompt


def test_statement_finished_knows_literals_and_comment_lines():
    assert not statement_finished("SELECT 'a;b' FROM t")
    assert statement_finished("SELECT 1;")
    assert statement_finished("SELECT 1\n-- Question: next")


def test_batched_generation_keeps_input_order(tiny_run):
    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    prompts = [build_prompt("CREATE TABLE a (x INTEGER)", "How many rows?"),
               build_prompt("CREATE TABLE singer (name VARCHAR, age INTEGER, country VARCHAR)", "Names of singers older than 30?")]
    batched = generate_sql(model, tokenizer, prompts, max_new_tokens=24, batch_size=2, progress=False)
    alone = [generate_sql(model, tokenizer, [p], max_new_tokens=24, progress=False)[0] for p in prompts]
    assert batched == alone and all(isinstance(s, str) for s in batched)


def test_closing_the_stream_stops_generation(tiny_model_path):
    model, tokenizer = load_for_inference("tiny-starcoder2")  # the random base never ends its statement
    lengths, generate = [], model.generate

    def counted(**kwargs):
        output = generate(**kwargs)
        lengths.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    model.generate = counted
    tokens_before = USAGE.snapshot()["tokens"]
    stream = stream_sql(model, tokenizer, build_prompt("CREATE TABLE a (x INTEGER)", "How many rows?"), max_new_tokens=1500)
    assert isinstance(next(stream), str)
    stream.close()  # what Gradio does on Stop or a disconnect
    assert not any(t.name == "starsql-generate" and t.is_alive() for t in threading.enumerate())
    assert lengths and lengths[0] < 1500
    assert USAGE.snapshot()["tokens"] == tokens_before + lengths[0]  # what it generated, though nobody read it all


def test_an_unclosed_stream_runs_to_max_new_tokens(tiny_model_path):
    # The control for the test above: left alone, this model uses every token it is given.
    model, tokenizer = load_for_inference("tiny-starcoder2")
    *_, text = stream_sql(model, tokenizer, build_prompt("CREATE TABLE a (x INTEGER)", "How many rows?"), max_new_tokens=200)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 150




def test_the_default_backend_is_plain_generate_on_the_model_as_loaded(tiny_run):
    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    backend = build_backend(model, tokenizer)
    assert type(backend) is GenerateBackend and backend.concurrency == 2
    prompt = build_prompt("CREATE TABLE a (x INTEGER)", "How many rows?")
    assert list(backend.stream(prompt, 24)) == list(stream_sql(model, tokenizer, prompt, 24))
    # Plain: no fused attention, no kernel routing; evaluation scores this model.
    assert all(type(m).__name__ == "Starcoder2Attention" for m in model.modules() if "Attention" in type(m).__name__)
    assert not any("Gemv" in type(m).__name__ for m in model.modules())
