"""Continuous batching (starsql.serve.fast.batched): requests join the running batch at the next step and leave
when done, and each gets exactly the greedy tokens it gets decoded alone; the backend over it, and the
warming backend that answers through plain generate() until the fast one is built."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from starsql.prompt import build_prompt
from starsql.serve.decode import USAGE, GenerateBackend, WarmingBackend, build_backend, stream_sql
from starsql.serve.fast import BatchedDecodeBackend
from starsql.serve.fast.batched import BatchedDecoder
from starsql.serve.fast.fused_qkv import fuse_qkv_projections
from starsql.serve.load import load_for_inference
from test_fast_decode import PROMPTS, chaotic_unfused, plain_greedy

# Prompts of different lengths: short, long, and one with a previous turn.
MORE_PROMPTS = PROMPTS + [
    build_prompt("CREATE TABLE t (id INTEGER, v TEXT)", "List every v."),
    build_prompt("CREATE TABLE orders (id INTEGER, total REAL, day TEXT); CREATE TABLE items (order_id INTEGER, sku TEXT)",
                 "Total per day of orders with more than two items?"),
]


@pytest.fixture(scope="module")
def chaotic(tiny_model_path):
    """The tiny model with large random weights, q/k/v fused as the fast backend serves it: every prompt token
    and position changes its output, and its logits are far from ties (fp32, CPU)."""
    model, tokenizer = chaotic_unfused()
    fuse_qkv_projections(model)
    return model, tokenizer


def ids_of(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def drain(request) -> list[int]:
    tokens = []
    while not request.out.empty():
        token = request.out.get()
        if token is None:
            break
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("queue_ahead", [False, True], ids=["step-by-step", "queue-ahead"])
def test_requests_joining_and_leaving_the_batch_get_their_solo_greedy_tokens(chaotic, queue_ahead):
    # Queued ahead (the GPU's way), each step is queued before the last one's tokens are handed out: the same
    # tokens, each a step later; steps attend over 64 or 128 positions while those hold every busy row.
    model, tokenizer = chaotic
    budgets = [40, 6, 30, 40, 12]  # the 6- and 12-token requests leave early; later ones take their slots
    arrivals = [0, 0, 3, 5, 9]  # the step at which each request is submitted
    expected = [plain_greedy(model, tokenizer, p, n) for p, n in zip(MORE_PROMPTS, budgets)]
    assert len({len(ids_of(tokenizer, p)[0]) for p in MORE_PROMPTS}) == len(MORE_PROMPTS)  # all lengths differ
    assert len({tuple(e) for e in expected}) == len(expected)  # and all answers: a mixed-up row would show

    decoder = BatchedDecoder(model, max_batch=4, max_length=256, buckets=(1, 2, 4), lengths=(64, 128), queue_ahead=queue_ahead)
    decoder.warm_up()
    lengths_used, advance = [], decoder._advance
    decoder._advance = lambda bucket: (lengths_used.append(bucket.length), advance(bucket))
    requests, batch_sizes, slots_seen = [None] * len(budgets), [], []
    for step in range(200):
        for i, at in enumerate(arrivals):
            if at == step:
                requests[i] = decoder.submit(ids_of(tokenizer, MORE_PROMPTS[i]), budgets[i], tokenizer.eos_token_id)
        busy = decoder.run_once()
        batch_sizes.append(busy)
        slots_seen.append(dict(decoder.slots))
        if not busy and all(r is not None for r in requests):
            break
    got = [drain(r) for r in requests]
    assert got == expected
    assert max(batch_sizes) == 4  # four decoded together at the peak, the batch's size
    # The 6-token request left after its last token, and its slot went to a request that came after it.
    six = requests[1]
    left_at = next(i for i, slots in enumerate(slots_seen) if six not in slots.values())
    # Its first token came from the prefill, its 5 others from steps 0..4 (handed out a step later when queued ahead).
    assert left_at == 5 - 1 + queue_ahead
    (its_slot,) = {slot for slot, request in slots_seen[0].items() if request is six}
    assert any(slots.get(its_slot) in (requests[3], requests[4]) for slots in slots_seen)
    assert not decoder.slots and int(decoder.live.sum()) == 0 and int(decoder.positions.abs().sum()) == 0
    assert set(lengths_used) == {64, 128}  # prompts of 28-76 tokens, up to 40 more: never the whole slot (256)


@pytest.mark.parametrize("queue_ahead", [False, True], ids=["step-by-step", "queue-ahead"])
def test_steps_attend_over_the_shortest_length_that_holds_every_busy_row(chaotic, queue_ahead):
    # A 76-token prompt and a 28-token one decode together over 128 positions; once the long one has left, the
    # short one's steps attend over 64 (its positions stay below 64), its free neighbour's row among them.
    model, tokenizer = chaotic
    short, long = MORE_PROMPTS[1], MORE_PROMPTS[4]
    assert len(ids_of(tokenizer, short)[0]) + 30 < 64 < len(ids_of(tokenizer, long)[0]) < 128 - 4
    expected = [plain_greedy(model, tokenizer, short, 30), plain_greedy(model, tokenizer, long, 4)]
    decoder = BatchedDecoder(model, max_batch=2, max_length=256, buckets=(2,), lengths=(64, 128), queue_ahead=queue_ahead)
    decoder.warm_up()
    lengths_used, advance = [], decoder._advance
    decoder._advance = lambda bucket: (lengths_used.append(bucket.length), advance(bucket))
    requests = [decoder.submit(ids_of(tokenizer, p), n, tokenizer.eos_token_id) for p, n in ((short, 30), (long, 4))]
    while decoder.run_once():
        pass
    assert [drain(r) for r in requests] == expected
    # 3 steps (4 queued ahead) with both rows, then the short one alone; one more queued ahead at its end.
    assert lengths_used == [128] * (3 + queue_ahead) + [64] * (29 - 3)


def test_requests_arriving_together_share_one_prefill_and_get_their_solo_greedy_tokens(chaotic):
    # Five prompts of five lengths waiting at once: one right-padded forward for all (or several, each within
    # `prefill_tokens`), each prompt's K/V in its own slot; a sixth arrives alone while they decode. With
    # prefill_tokens=0 (DECODE_PREFILL_TOKENS=0), each prompt is prefilled alone.
    import starsql.serve.fast.batched as batched

    model, tokenizer = chaotic
    prompts = MORE_PROMPTS + [PROMPTS[0]]
    expected = [plain_greedy(model, tokenizer, p, 20) for p in prompts]
    lengths = [len(ids_of(tokenizer, p)[0]) for p in MORE_PROMPTS]
    default = batched.PREFILL_TOKENS
    for limit in (default, 2 * max(lengths), 0):
        decoder = BatchedDecoder(model, max_batch=8, max_length=256, buckets=(2, 4, 8), prefill_tokens=None if limit == default else limit)
        decoder.warm_up()
        shapes, together = [], decoder._prefill_together

        def recorded(group, slots):
            shapes.append((len(group), max(r.input_ids.shape[-1] for r in group)))
            return together(group, slots)

        decoder._prefill_together = recorded
        requests = [decoder.submit(ids_of(tokenizer, p), 20, tokenizer.eos_token_id) for p in MORE_PROMPTS]
        decoder.run_once()
        forwards = decoder.timings.snapshot()["prefills"]
        assert decoder.timings.snapshot()["prefilled"] == len(MORE_PROMPTS)
        assert all(rows * width <= limit for rows, width in shapes)
        expected_forwards = {default: [1], 0: [len(MORE_PROMPTS)]}.get(limit, range(2, len(MORE_PROMPTS)))
        assert forwards in expected_forwards and (limit or not shapes)
        requests.append(decoder.submit(ids_of(tokenizer, prompts[-1]), 20, tokenizer.eos_token_id))
        while decoder.run_once():
            pass
        assert [drain(r) for r in requests] == expected
        assert decoder.timings.snapshot()["prefills"] == forwards + 1  # the latecomer: a prefill of its own
        assert decoder.timings.snapshot()["prefilled"] == len(prompts)


def test_the_engine_times_each_requests_wait_from_its_submission_to_its_first_token(chaotic):
    # /usage's time to a first token in the model's process: one request waits 0.2 s before the engine admits it
    # together with one just submitted; each is timed from its own submission.
    model, tokenizer = chaotic
    decoder = BatchedDecoder(model, max_batch=2, max_length=256, buckets=(2,), lengths=())
    decoder.warm_up()
    ids = ids_of(tokenizer, MORE_PROMPTS[0])
    early = decoder.submit(ids, 4, tokenizer.eos_token_id)
    time.sleep(0.2)
    late = decoder.submit(ids, 4, tokenizer.eos_token_id)
    started = time.perf_counter()
    decoder.run_once()
    admitted = time.perf_counter() - started
    waits = decoder.timings.first_tokens.snapshot()
    assert waits["count"] == 2
    early_wait, late_wait = waits["recent_s"]  # in the order admitted: the same width, the order submitted
    assert early_wait >= 0.2 and late_wait <= admitted + 0.01 and early_wait - late_wait >= 0.19


@pytest.mark.parametrize("queue_ahead", [False, True], ids=["step-by-step", "queue-ahead"])
def test_a_request_done_on_its_first_token_leaves_its_row_within_the_shorter_steps(chaotic, queue_ahead):
    # A 76-token prompt asking for one token ends on its prefill; its free row, between two short requests', is
    # still in every step of 4 rows, which now attend over 64 positions: it must not write at position 76.
    model, tokenizer = chaotic
    prompts, budgets = [MORE_PROMPTS[1], MORE_PROMPTS[4], MORE_PROMPTS[3]], [20, 1, 20]  # 28, 76 and 33 tokens
    expected = [plain_greedy(model, tokenizer, p, n) for p, n in zip(prompts, budgets)]
    decoder = BatchedDecoder(model, max_batch=4, max_length=256, buckets=(4,), lengths=(64, 128), queue_ahead=queue_ahead)
    decoder.warm_up()
    lengths_used, advance = [], decoder._advance
    decoder._advance = lambda bucket: (lengths_used.append(bucket.length), advance(bucket))
    requests = [decoder.submit(ids_of(tokenizer, p), n, tokenizer.eos_token_id) for p, n in zip(prompts, budgets)]
    decoder.run_once()
    assert sorted(decoder.slots) == [0, 1]  # the short ones (prefilled shortest first); slot 2 free again
    while decoder.run_once():
        pass
    assert [drain(r) for r in requests] == expected and set(lengths_used) == {64}
    assert decoder.error is None and int(decoder.positions.abs().sum()) == 0


def test_a_joint_prefill_out_of_memory_falls_back_to_one_at_a_time_and_any_other_error_reaches_every_caller(chaotic):
    model, tokenizer = chaotic
    expected = [plain_greedy(model, tokenizer, p, 12) for p in MORE_PROMPTS[:3]]

    def out_of_memory(group, slots):
        raise torch.OutOfMemoryError("the joint forward's activations")

    decoder = BatchedDecoder(model, max_batch=4, max_length=256, buckets=(4,))
    decoder.warm_up()
    decoder._prefill_together = out_of_memory
    requests = [decoder.submit(ids_of(tokenizer, p), 12, tokenizer.eos_token_id) for p in MORE_PROMPTS[:3]]
    while decoder.run_once():
        pass
    assert [drain(r) for r in requests] == expected  # each prompt prefilled alone instead
    assert decoder.timings.snapshot()["prefills"] == 1 and decoder.error is None

    def broken(group, slots):
        raise RuntimeError("a broken forward")

    decoder = BatchedDecoder(model, max_batch=4, max_length=256, buckets=(4,))
    decoder.warm_up()
    decoder._prefill_together = broken
    for prompt in MORE_PROMPTS[:3]:  # waiting together when the engine starts: one joint prefill, which fails
        decoder.submit(ids_of(tokenizer, prompt), 12, tokenizer.eos_token_id)
    errors = []

    def ask(prompt):
        try:
            list(decoder.tokens(ids_of(tokenizer, prompt), 12, tokenizer.eos_token_id))
        except RuntimeError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=ask, args=(p,)) for p in MORE_PROMPTS[3:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)  # nobody hangs
    assert len(errors) == 2 and all("a broken forward" in e for e in errors)
    assert isinstance(decoder.error, RuntimeError)


def test_prompts_forwards_never_attend_through_cudnn(chaotic, monkeypatch):
    # cuDNN's attention builds a plan for each new prompt shape the first time, a stall the whole batch waits
    # out on a GPU: both prefills (a lone prompt's, prompts together) attend without it; the steps do not use SDPA.
    model, tokenizer = chaotic
    cudnn_on = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        cudnn_on.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    decoder = BatchedDecoder(model, max_batch=4, max_length=256, buckets=(4,))
    decoder.warm_up()
    alone = decoder.submit(ids_of(tokenizer, PROMPTS[0]), 3, tokenizer.eos_token_id)
    decoder.run_once()
    together = [decoder.submit(ids_of(tokenizer, p), 3, tokenizer.eos_token_id) for p in MORE_PROMPTS[1:3]]
    while decoder.run_once():
        pass
    assert decoder.timings.snapshot()["prefills"] == 2 and drain(alone) and all(drain(r) for r in together)
    assert cudnn_on and not any(cudnn_on)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # switched off for the prefills only


SCHEMA = ("CREATE TABLE singer (singer_id INTEGER, name VARCHAR, country VARCHAR, age INTEGER); "
          "CREATE TABLE concert (concert_id INTEGER, concert_name VARCHAR, stadium_id INTEGER, year INTEGER); "
          "CREATE TABLE singer_in_concert (concert_id INTEGER, singer_id INTEGER)")
FIRST = build_prompt(SCHEMA, "How many singers are there?")
SAME_SCHEMA = [build_prompt(SCHEMA, "Names of singers from France?"), build_prompt(SCHEMA, "Concerts per year?")]
FOLLOW_UP = build_prompt(SCHEMA, "And from Spain?", history=[("How many singers are there?", "SELECT count(*) FROM singer")])


def prompt_kv(decoder, request) -> torch.Tensor:
    """The K/V of the request's prompt in its slot, every layer's (while it decodes)."""
    (slot,) = [slot for slot, busy in decoder.slots.items() if busy is request]
    length = request.input_ids.shape[-1]
    return torch.cat([cache[slot, :, :length] for cache in decoder.keys + decoder.values])


def whole_prefill_kv(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The K/V of a prompt prefilled whole, alone."""
    decoder = BatchedDecoder(model, max_batch=1, max_length=512, prefixes=0)
    decoder.warm_up()
    request = decoder.submit(input_ids, 8, None)
    decoder.run_once()
    return prompt_kv(decoder, request)


def shared_tokens(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many first tokens two prompts share, at most all but b's last."""
    a, b = a.view(-1), b.view(-1)
    most = min(len(a), len(b) - 1)
    return next((i for i in range(most) if a[i] != b[i]), most)


@pytest.mark.parametrize("queue_ahead", [False, True], ids=["step-by-step", "queue-ahead"])
def test_prompts_that_begin_alike_are_prefilled_from_where_they_part_and_get_their_solo_greedy_tokens(chaotic, queue_ahead):
    # Questions about one database share its schema: the K/V of the first prompt are kept, and each later prompt
    # gets its longest shared prefix restored into its slot and runs only the rest through the model: two at once in
    # one forward from different starts, and a follow-up whose prompt begins with a whole earlier one. With
    # prefixes=0 (DECODE_PREFIXES=0, the default) every prompt is prefilled whole: the same tokens.
    model, tokenizer = chaotic
    ids = {p: ids_of(tokenizer, p) for p in [FIRST, *SAME_SCHEMA, FOLLOW_UP, MORE_PROMPTS[3]]}
    expected = {p: plain_greedy(model, tokenizer, p, 16) for p in ids}
    assert shared_tokens(ids[FIRST], ids[FOLLOW_UP]) == len(ids[FIRST][0])  # the follow-up begins with the first
    for prefixes in (4, 0):
        decoder = BatchedDecoder(model, max_batch=4, max_length=256, buckets=(4,), lengths=(64, 128), queue_ahead=queue_ahead,
                                 prefixes=prefixes)  # steps and joint prefills over 64, 128 or 256 positions
        decoder.warm_up()
        first = decoder.submit(ids[FIRST], 16, tokenizer.eos_token_id)
        decoder.run_once()
        later = {p: decoder.submit(ids[p], 16, tokenizer.eos_token_id) for p in [SAME_SCHEMA[0], FOLLOW_UP, MORE_PROMPTS[3]]}
        decoder.run_once()  # the three waiting together: one forward
        for prompt, request in later.items():  # each prompt's K/V as its whole prefill writes them
            torch.testing.assert_close(prompt_kv(decoder, request), whole_prefill_kv(model, ids[prompt]), atol=1e-4, rtol=1e-4)
        while decoder.run_once():
            pass
        last = decoder.submit(ids[SAME_SCHEMA[1]], 16, tokenizer.eos_token_id)  # kept: the first and the three after it
        while decoder.run_once():
            pass
        requests = {FIRST: first, **later, SAME_SCHEMA[1]: last}
        assert {p: drain(r) for p, r in requests.items()} == expected
        usage = decoder.timings.snapshot()
        assert usage["prefills"] == 3 and usage["prompt_tokens"] == sum(len(i[0]) for i in ids.values())
        if prefixes == 0:
            assert usage["reused_tokens"] == 0 and not any(r.reused for r in requests.values())
            continue
        kept_before = [ids[FIRST]]
        assert first.reused == 0 and later[SAME_SCHEMA[0]].reused == shared_tokens(ids[FIRST], ids[SAME_SCHEMA[0]]) > 0
        assert later[FOLLOW_UP].reused == len(ids[FIRST][0]) and later[MORE_PROMPTS[3]].reused < 20  # another schema
        kept_before += [ids[p] for p in later]
        assert last.reused == max(shared_tokens(k, ids[SAME_SCHEMA[1]]) for k in kept_before)
        assert usage["reused_tokens"] == sum(r.reused for r in requests.values())
        assert usage["reused_tokens"] > usage["prompt_tokens"] / 2  # most of each prompt is its schema


def test_a_prefix_found_for_a_prompt_is_restored_before_another_prompt_takes_its_entry(chaotic):
    # One kept prompt. Two arrive together, prefilled one at a time (prefill_tokens=0): a short one that shares
    # no token with it first, then one that shares the kept prompt's schema. Prompts are kept only after the
    # admission's last prefill: kept at once, the first would have taken the entry the second was found in, and
    # the second would decode from the wrong K/V.
    model, tokenizer = chaotic
    other, alike = "SELECT name FROM", SAME_SCHEMA[0]
    expected = [plain_greedy(model, tokenizer, p, 12) for p in (other, alike)]
    decoder = BatchedDecoder(model, max_batch=4, max_length=256, buckets=(4,), prefill_tokens=0, prefixes=1)
    decoder.warm_up()
    decoder.submit(ids_of(tokenizer, FIRST), 1, tokenizer.eos_token_id)
    decoder.run_once()
    requests = [decoder.submit(ids_of(tokenizer, p), 12, tokenizer.eos_token_id) for p in (other, alike)]
    decoder.run_once()
    assert requests[0].reused == 0 and decoder.timings.snapshot()["prefills"] == 3  # one forward each
    assert len(ids_of(tokenizer, other)[0]) < len(ids_of(tokenizer, alike)[0]) - requests[1].reused  # the first of them
    torch.testing.assert_close(prompt_kv(decoder, requests[1]), whole_prefill_kv(model, ids_of(tokenizer, alike)), atol=1e-4, rtol=1e-4)
    while decoder.run_once():
        pass
    assert requests[1].reused > 0 and [drain(r) for r in requests] == expected


def test_a_rest_wider_than_any_prefill_graph_runs_eagerly_from_its_restored_prefix(chaotic):
    # A long question about a kept schema: its rest (past the schema) is wider than GRAPH_WIDTHS, so it and a short
    # one arriving with it are prefilled together eagerly, each from its own restored prefix.
    from starsql.serve.fast.batched import GRAPH_WIDTHS

    model, tokenizer = chaotic
    long = build_prompt(SCHEMA, "Which singers are " + ", ".join(f"from country number {i}" for i in range(24)) + "?")
    prompts = [long, SAME_SCHEMA[0]]
    expected = [plain_greedy(model, tokenizer, p, 12) for p in prompts]
    decoder = BatchedDecoder(model, max_batch=4, max_length=512, buckets=(4,), prefixes=4)
    decoder.warm_up()
    decoder.submit(ids_of(tokenizer, FIRST), 1, tokenizer.eos_token_id)
    decoder.run_once()
    requests = [decoder.submit(ids_of(tokenizer, p), 12, tokenizer.eos_token_id) for p in prompts]
    decoder.run_once()
    rest = len(ids_of(tokenizer, long)[0]) - requests[0].reused
    assert requests[0].reused > 0 and requests[1].reused > 0 and rest > max(GRAPH_WIDTHS)
    assert decoder._prefill_graph_for(2, rest, len(ids_of(tokenizer, long)[0])) is None
    assert decoder.timings.snapshot()["prefills"] == 2  # the first prompt, then these two together
    for prompt, request in zip(prompts, requests):
        torch.testing.assert_close(prompt_kv(decoder, request), whole_prefill_kv(model, ids_of(tokenizer, prompt)), atol=1e-4, rtol=1e-4)
    while decoder.run_once():
        pass
    assert [drain(r) for r in requests] == expected


def test_a_restored_prompt_whose_forward_runs_out_of_memory_is_prefilled_whole(chaotic):
    model, tokenizer = chaotic
    decoder = BatchedDecoder(model, max_batch=4, max_length=256, buckets=(4,), prefixes=2)
    decoder.warm_up()
    decoder.submit(ids_of(tokenizer, FIRST), 1, tokenizer.eos_token_id)
    decoder.run_once()

    def out_of_memory(group, slots):
        raise torch.OutOfMemoryError("the forward's activations")

    decoder._prefill_together = out_of_memory  # a restored prefix goes through it, even alone
    request = decoder.submit(ids_of(tokenizer, SAME_SCHEMA[0]), 12, tokenizer.eos_token_id)
    while decoder.run_once():
        pass
    assert drain(request) == plain_greedy(model, tokenizer, SAME_SCHEMA[0], 12) and decoder.error is None
    assert request.reused == 0 and decoder.timings.snapshot()["reused_tokens"] == 0  # prefilled whole, counted so


def test_the_prefix_store_keeps_the_newest_prompts_and_lets_a_turn_take_the_entry_of_the_one_it_extends():
    from starsql.serve.fast.prefixes import PrefixStore

    store = PrefixStore(2, layers=1, slot_shape=(1, 9, 1), dtype=torch.float32, device="cpu")  # 8 tokens and a spare
    slots = [torch.arange(4 * 9, dtype=torch.float32).view(4, 1, 9, 1)]  # slot s holds 9s .. 9s + 8
    prompt = lambda *tokens: torch.tensor([tokens])  # noqa: E731
    assert store.find(prompt(1, 2, 3)) == (-1, 0)
    store.keep(prompt(1, 2, 3), slots, slots, slot=1)
    assert store.find(prompt(1, 2, 3, 4)) == (0, 3) and store.find(prompt(1, 2, 3)) == (0, 2)  # one token left to run
    store.keep(prompt(1, 2), slots, slots, slot=2)  # the kept prompt begins with all of it: nothing new kept
    assert store.prompts[1] is None
    store.keep(prompt(1, 2, 3, 4, 5), slots, slots, slot=2)  # a turn after the kept prompt: takes its entry
    assert [p.tolist() for p in store.prompts if p is not None] == [[1, 2, 3, 4, 5]]
    store.keep(prompt(7, 7), slots, slots, slot=3)
    store.find(prompt(1, 2, 9))  # the first entry found: used last
    store.keep(prompt(8, 8, 8), slots, slots, slot=0)  # replaces the least recently used: (7, 7)
    assert [p.tolist() for p in store.prompts] == [[1, 2, 3, 4, 5], [8, 8, 8]]
    store.keep(prompt(*range(9)), slots, slots, slot=0)  # longer than an entry keeps: not kept
    assert [p.tolist() for p in store.prompts] == [[1, 2, 3, 4, 5], [8, 8, 8]]
    target = [torch.zeros(4, 1, 9, 1)]
    store.restore(0, target, target, slot=3)
    assert target[0][3, 0, :, 0].tolist() == list(range(18, 27))  # slot 2's row, as it was kept
    assert target[0][:3].abs().sum() == 0


@pytest.mark.parametrize("queue_ahead", [False, True], ids=["step-by-step", "queue-ahead"])
def test_requests_from_many_threads_at_once_get_their_solo_greedy_tokens(chaotic, queue_ahead):
    # As the app calls it: each request from its own thread, through the engine thread; one stream closed
    # early (Stop) leaves the others unchanged and frees its slot.
    model, tokenizer = chaotic
    expected = [plain_greedy(model, tokenizer, p, 24) for p in MORE_PROMPTS]
    decoder = BatchedDecoder(model, max_batch=4, max_length=256, buckets=(2, 4), lengths=(64,), queue_ahead=queue_ahead)
    results = [None] * len(MORE_PROMPTS)
    go = threading.Barrier(len(MORE_PROMPTS) + 1)

    def ask(i):
        go.wait()
        results[i] = list(decoder.tokens(ids_of(tokenizer, MORE_PROMPTS[i]), 24, tokenizer.eos_token_id))

    stopped = decoder.tokens(ids_of(tokenizer, PROMPTS[0]), 24)
    assert next(stopped) == expected[0][0]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(MORE_PROMPTS))]
    for thread in threads:
        thread.start()
    go.wait()
    stopped.close()
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected  # five requests through four slots: one waited for a free one
    assert decoder.error is None and not decoder.slots


def within(seconds: float, function, *args):
    """function(*args) in a thread, its result within `seconds` (a test fails, not hangs, on a stuck engine)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result(timeout=seconds)


@pytest.mark.parametrize("queue_ahead", [False, True], ids=["step-by-step", "queue-ahead"])
def test_a_closed_decoder_finishes_the_answers_it_has_then_its_engine_ends(chaotic, queue_ahead):
    # A faster decoder replaces this one: what it decodes ends as it would have; nothing new reaches it.
    model, tokenizer = chaotic
    expected = plain_greedy(model, tokenizer, PROMPTS[1], 20)
    decoder = BatchedDecoder(model, max_batch=2, max_length=256, buckets=(2,), lengths=(64,), queue_ahead=queue_ahead)
    answer = decoder.tokens(ids_of(tokenizer, PROMPTS[1]), 20, tokenizer.eos_token_id)
    first = within(60, lambda: [next(answer), next(answer)])
    decoder.close()
    with pytest.raises(RuntimeError, match="closed: a newer one serves"):
        decoder.submit(ids_of(tokenizer, PROMPTS[0]), 4)
    assert first + within(60, list, answer) == expected
    decoder._engine.join(timeout=30)
    assert not decoder._engine.is_alive() and decoder.error is None and not decoder.slots
    assert decoder.keys == [] and decoder.buckets == {}  # caches and graphs let go of at once
    idle = BatchedDecoder(model, max_batch=2, max_length=256, buckets=(2,), lengths=(64,), queue_ahead=queue_ahead)
    assert len(within(60, list, idle.tokens(ids_of(tokenizer, PROMPTS[0]), 3))) == 3
    idle.close()  # nothing decoding: the engine ends at once
    idle._engine.join(timeout=30)
    assert not idle._engine.is_alive()


def test_a_request_submitted_before_close_is_served_even_if_the_engine_had_not_started(chaotic):
    model, tokenizer = chaotic
    decoder = BatchedDecoder(model, max_batch=2, max_length=256, buckets=(2,), lengths=(64,))
    request = decoder.submit(ids_of(tokenizer, PROMPTS[0]), 5)
    decoder.close()
    decoder.start()  # as tokens() does after its submit
    assert within(60, lambda: [request.out.get() for _ in range(6)]) == plain_greedy(model, tokenizer, PROMPTS[0], 5) + [None]
    decoder._engine.join(timeout=30)
    assert not decoder._engine.is_alive()


def test_an_engine_failing_after_close_reaches_its_request_and_ends(chaotic):
    model, tokenizer = chaotic
    decoder = BatchedDecoder(model, max_batch=2, max_length=256, buckets=(2,), lengths=(64,), queue_ahead=False)
    answer = decoder.tokens(ids_of(tokenizer, PROMPTS[1]), 20)
    within(60, next, answer)
    steps = decoder._queue_step

    def failing_after_close():
        if decoder._closing:
            raise RuntimeError("the GPU fell over")
        return steps()

    decoder._queue_step = failing_after_close
    decoder.close()
    with pytest.raises(RuntimeError, match="The batched decoder stopped.*the GPU fell over"):
        within(60, list, answer)
    decoder._engine.join(timeout=30)
    assert not decoder._engine.is_alive() and decoder.keys == []


class _Backend:
    """A stand-in built backend: answers "<name> 1", "<name> 2", pausing at `hold` (while set) between them."""

    def __init__(self, name: str):
        self.name, self.closed, self.hold = name, 0, threading.Event()

    def stream(self, prompt, max_new_tokens, temperature=0.0):
        yield f"{self.name} 1"
        while self.hold.is_set():
            threading.Event().wait(0.01)
        yield f"{self.name} 2"

    def close(self):
        self.closed += 1


def test_a_faster_backend_replaces_the_first_once_built_and_the_first_closes_after_its_last_answer(capfd):
    plain, eager, compiled = _Backend("plain"), _Backend("eager"), _Backend("compiled")
    first_built, faster_go = threading.Event(), threading.Event()
    warming = WarmingBackend(plain, lambda: eager, concurrency=4,
                             faster=lambda: (first_built.set(), faster_go.wait(30), compiled)[2])  # fmt: skip
    assert first_built.wait(30) and warming.fast is eager and not warming.ready.is_set()
    eager.hold.set()
    begun = warming.stream("q", 8)
    assert next(begun) == "eager 1"  # an answer in progress on the eager backend
    faster_go.set()
    assert warming.wait(30) is compiled and warming.fast is compiled
    assert list(warming.stream("q", 8)) == ["compiled 1", "compiled 2"]  # new answers: the faster one
    assert eager.closed == 0  # not while its answer runs
    eager.hold.clear()
    assert list(begun) == ["eager 2"] and eager.closed == 1 and compiled.closed == 0 and plain.closed == 0
    log = capfd.readouterr().err
    assert "Fast decoding is on (" in log and "a faster build follows" in log and "Fast decoding is ready (" in log


def test_a_failing_faster_build_leaves_the_first_backend_answering():
    eager = _Backend("eager")

    def failing():
        raise RuntimeError("Triton cannot compile")

    with pytest.warns(UserWarning, match="Fast decoding is off.*Triton cannot compile.*answers use an earlier build"):
        warming = WarmingBackend(_Backend("plain"), lambda: eager, concurrency=2, faster=failing)
        assert warming.wait(30) is eager
    assert list(warming.stream("q", 8)) == ["eager 1", "eager 2"] and eager.closed == 0


def test_a_replaced_backend_with_no_answer_running_is_closed_at_once():
    eager, compiled = _Backend("eager"), _Backend("compiled")
    warming = WarmingBackend(_Backend("plain"), lambda: eager, concurrency=2, faster=lambda: compiled)
    assert warming.wait(30) is compiled and eager.closed == 1 and compiled.closed == 0


def test_what_startup_made_is_frozen_out_of_collections_once_the_builds_end(monkeypatch):
    # A full collection walks every object the process holds (torch, the model, compiled code) while all threads
    # wait: once the fast backend's builds end, those are moved where collections no longer look. GC_FREEZE=0: not.
    import gc

    from starsql.serve.decode import freeze_long_lived_objects

    # Freezes are told apart by the thread that asks: another test's backend may end its build meanwhile.
    events, frozen, go = [], [], threading.Event()
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(threading.get_ident()))

    def build(name):
        go.wait(30)
        events.append((name, threading.get_ident()))
        return _Backend(name)

    warming = WarmingBackend(_Backend("plain"), lambda: build("fast"), 2)
    go.set()
    assert warming.wait(30) is not None
    (_, builder), = events
    for _ in range(300):
        if builder in frozen:
            break
        threading.Event().wait(0.01)
    assert frozen.count(builder) == 1
    monkeypatch.setenv("GC_FREEZE", "0")
    seen = len(frozen)  # a thread's ident may be reused once it ends: only freezes from now on count
    assert WarmingBackend(_Backend("plain"), lambda: build("fast, GC_FREEZE=0"), 2).wait(30) is not None
    threading.Event().wait(0.2)
    assert events[1][1] not in frozen[seen:] and freeze_long_lived_objects() is False
    monkeypatch.setenv("GC_FREEZE", "later")
    with pytest.raises(ValueError, match="GC_FREEZE must be 1 .* or 0"):
        freeze_long_lived_objects()
    monkeypatch.undo()  # the real gc.freeze: what lives now leaves the collected generations
    before = gc.get_freeze_count()
    try:
        assert freeze_long_lived_objects() is True and gc.get_freeze_count() > before
        assert gc.get_freeze_count() - before > len(gc.get_objects()) / 2  # most of what this process holds
    finally:
        gc.unfreeze()


def test_build_backend_serves_eager_graphs_first_then_the_compiled_ones(tiny_run, monkeypatch):
    import starsql.serve.fast as fast_package

    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    builds, timings, required = [], [], []
    monkeypatch.setattr(fast_package, "build", lambda *a, compile, **k: (builds.append(compile), timings.append(k.get("timings")),
                                                                          required.append(k.get("replaces", False)), f"compile={compile}")[3])  # fmt: skip
    monkeypatch.setenv("DECODE_BATCH", "2")
    assert build_backend(model, tokenizer, fast=True).wait(30) == "compile=True" and builds == [False, True]
    assert timings[0] is timings[1] is not None  # one set of engine totals for /usage, across the swap
    assert required == [False, True]  # the compiled build replaces eager graphs: without graphs of its own it must not

    def eager_fails(*args, compile, **kwargs):
        required.append(kwargs.get("replaces", False))
        if not compile:
            raise RuntimeError("no CUDA graphs here")
        return "compile=True"

    with monkeypatch.context() as patched, pytest.warns(UserWarning, match="Fast decoding is off.*no CUDA graphs here"):
        patched.setattr(fast_package, "build", eager_fails)
        assert build_backend(model, tokenizer, fast=True).wait(30) == "compile=True"
    assert required[-2:] == [False, False]  # nothing to replace: plain generate() serves
    monkeypatch.setenv("DECODE_EAGER_FIRST", "0")  # plain generate() answers until the compiled step is built
    builds.clear()
    assert build_backend(model, tokenizer, fast=True).wait(30) == "compile=True" and builds == [True]
    assert required[-1] is False  # replaces plain generate(): even without graphs it batches
    monkeypatch.setenv("DECODE_EAGER_FIRST", "1")
    monkeypatch.setenv("DECODE_COMPILE", "0")  # eager graphs only: one build
    builds.clear()
    assert build_backend(model, tokenizer, fast=True).wait(30) == "compile=False" and builds == [False]
    monkeypatch.setenv("DECODE_EAGER_FIRST", "soon")
    with pytest.raises(ValueError, match="DECODE_EAGER_FIRST must be 1"):
        build_backend(model, tokenizer, fast=True)


def test_a_build_that_replaces_a_serving_decoder_needs_its_cuda_graphs(tiny_run, monkeypatch):
    from types import SimpleNamespace

    import starsql.serve.fast as fast_package
    from starsql.serve.fast import check_graphs

    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    checked = []
    monkeypatch.setattr(fast_package, "check_graphs", lambda decoder, required: checked.append((type(decoder).__name__, required)))
    for batch in (2, 1):  # the batched decoder and the one-stream one, each checked once warmed up
        backend = fast_package.build(model, tokenizer, batch, max_length=256, compile=False, replaces=True)
        getattr(backend.decoder, "close", lambda: None)()
    assert checked == [("BatchedDecoder", True), ("GreedyDecoder", True)]

    lost = SimpleNamespace(device=torch.device("cuda"), use_graph=False)  # its capture failed (a warning said so)
    with pytest.raises(RuntimeError, match="CUDA graphs could not be captured.*slower than the decoder that serves"):
        check_graphs(lost, required=True)
    check_graphs(lost, required=False)  # the first build: batching without graphs still beats generate()
    check_graphs(SimpleNamespace(device=torch.device("cuda"), use_graph=True), required=True)
    check_graphs(SimpleNamespace(device=torch.device("cpu"), use_graph=False), required=True)  # a CPU has none to lose
    released = BatchedDecoder.__new__(BatchedDecoder)  # a batched one gives its caches back before it is dropped
    released.device, released.use_graph, released._release = torch.device("cuda"), False, lambda: checked.append("released")
    with pytest.raises(RuntimeError, match="could not be captured"):
        check_graphs(released, required=True)
    assert checked[-1] == "released"


def test_a_failed_build_that_would_replace_a_serving_decoder_leaves_its_model_as_it_is(tiny_run, monkeypatch):
    # The eager decoder that serves runs the model with the kernel on: a failed compiled build must not turn it off.
    import starsql.serve.fast as fast_package

    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    switched = []
    monkeypatch.setattr(fast_package, "prepare_model", lambda model: True)  # the kernel is on (a GPU with Triton)
    monkeypatch.setattr(fast_package, "use_gemv", lambda model, enabled=True: switched.append(enabled))

    def lost(decoder, required):
        raise RuntimeError("its CUDA graphs could not be captured")

    monkeypatch.setattr(fast_package, "check_graphs", lost)
    for replaces in (True, False):
        with pytest.raises(RuntimeError, match="could not be captured"):
            fast_package.build(model, tokenizer, 2, max_length=256, compile=False, replaces=replaces)
    assert switched == [False]  # only the build that replaces nothing turns the kernel off again


def test_cuda_graphs_are_captured_one_at_a_time_across_threads(monkeypatch):
    # A serving decoder captures a prompt width's prefill on first use while a faster build captures its steps.
    import contextlib
    import time

    from starsql.serve.fast import decoder as decoder_module

    class Stream:
        device = "cuda"

        def wait_stream(self, other):
            pass

    capturing, most = [0], [0]

    @contextlib.contextmanager
    def graph(*args, **kwargs):
        capturing[0] += 1
        most[0] = max(most[0], capturing[0])
        try:
            yield
        finally:
            capturing[0] -= 1

    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    with ThreadPoolExecutor(4) as pool:
        captured = list(pool.map(lambda n: decoder_module.capture_graph(lambda: time.sleep(0.05) or n, Stream(), 1, "a step"),
                                 range(4)))  # fmt: skip
    assert [output for _graph, output in captured] == [0, 1, 2, 3] and most[0] == 1


def test_the_batched_backend_streams_what_generate_streams_and_falls_back_for_sampling(tiny_run):
    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    before = USAGE.snapshot()
    expected = [list(stream_sql(model, tokenizer, prompt, max_new_tokens=48))[-1] for prompt in PROMPTS]
    plain_used = USAGE.snapshot()
    fuse_qkv_projections(model)
    fast = BatchedDecodeBackend(model, tokenizer, BatchedDecoder(model, max_batch=2, max_length=256))
    assert fast.concurrency == 2
    assert [list(fast.stream(prompt, 48))[-1] for prompt in PROMPTS] == expected
    # /usage counts the same tokens, whichever backend generated them.
    after = USAGE.snapshot()
    assert after["answers"] - plain_used["answers"] == plain_used["answers"] - before["answers"] == len(PROMPTS)
    assert after["tokens"] - plain_used["tokens"] == plain_used["tokens"] - before["tokens"] > 0
    decoded = fast.decoder.tokens
    fast.decoder.tokens = None  # sampling and a prompt too long for a slot must not reach the decoder
    assert list(fast.stream(PROMPTS[0], 8, temperature=0.7))
    assert list(fast.stream(PROMPTS[0], 256))[-1] == list(stream_sql(model, tokenizer, PROMPTS[0], 256))[-1]
    fast.decoder.tokens = decoded


def test_build_backend_answers_with_generate_while_the_fast_backend_warms_up(tiny_run, monkeypatch):
    import starsql.serve.fast as fast_package

    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    prompt = PROMPTS[1]
    *_, expected = stream_sql(model, tokenizer, prompt, max_new_tokens=32)
    release, building = threading.Event(), threading.Event()
    build = fast_package.build

    def slow_build(*args, **kwargs):  # compiling and capturing takes minutes on a GPU
        building.set()
        assert release.wait(60)
        return build(*args, **kwargs)

    monkeypatch.setattr(fast_package, "build", slow_build)
    monkeypatch.setenv("DECODE_BATCH", "3")
    chosen = build_backend(model, tokenizer, fast=True)
    assert type(chosen) is WarmingBackend and chosen.concurrency == 3  # the batch, from the start: Gradio reads it once
    assert building.wait(60) and not chosen.ready.is_set()
    *_, meanwhile = chosen.stream(prompt, 32)
    assert meanwhile == expected and chosen.fast is None  # answered by plain generate() while warming up
    release.set()
    ready = chosen.wait(60)
    assert type(ready) is BatchedDecodeBackend and ready.decoder.max_batch == 3 and chosen.build_s is not None
    calls = []
    tokens = ready.decoder.tokens
    ready.decoder.tokens = lambda *a, **k: (calls.append(1), (yield from tokens(*a, **k)))[1]
    *_, after = chosen.stream(prompt, 32)
    assert after == expected and calls  # now through the batched decoder


def test_decode_batch_switch_picks_the_one_stream_decoder_and_rejects_nonsense(tiny_run, monkeypatch):
    from starsql.serve.fast import FastDecodeBackend

    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    monkeypatch.setenv("DECODE_BATCH", "1")
    chosen = build_backend(model, tokenizer, fast=True)
    assert type(chosen.wait(60)) is FastDecodeBackend
    assert type(build_backend(model, tokenizer)) is GenerateBackend  # not fast: plain generate(), as before
    monkeypatch.setenv("DECODE_BATCH", "many")
    with pytest.raises(ValueError, match="DECODE_BATCH must be a whole number"):
        build_backend(model, tokenizer, fast=True)
    monkeypatch.setenv("DECODE_BATCH", "2")
    monkeypatch.setenv("DECODE_COMPILE", "maybe")
    with pytest.raises(ValueError, match="DECODE_COMPILE must be 1"):
        build_backend(model, tokenizer, fast=True)
    monkeypatch.setenv("DECODE_COMPILE", "0")
    monkeypatch.setenv("DECODE_PREFILL_TOKENS", "0")  # each prompt prefilled alone: the baseline of joint prefills
    decoder = build_backend(model, tokenizer, fast=True).wait(60).decoder
    assert decoder.prefill_tokens == 0 and decoder.queue_ahead and decoder.lengths == [256, 512, 1024, 2048]
    assert decoder.rows_kernel  # steps of a few rows through the rows kernel (where the model routes them)
    assert decoder.prefixes is None and not decoder.prefill_graphs  # by default no prompt is kept
    monkeypatch.setenv("DECODE_PREFIXES", "3")
    assert len(build_backend(model, tokenizer, fast=True).wait(60).decoder.prefixes.prompts) == 3
    monkeypatch.setenv("DECODE_LENGTHS", "0")  # every step over whole slots, each step read before the next
    monkeypatch.setenv("DECODE_QUEUE_AHEAD", "0")
    monkeypatch.setenv("DECODE_PREFIXES", "0")  # every prompt prefilled whole
    monkeypatch.setenv("DECODE_ROWS_KERNEL", "0")  # steps of a few rows on cuBLAS
    decoder = build_backend(model, tokenizer, fast=True).wait(60).decoder
    assert not decoder.queue_ahead and decoder.lengths == [2048] and decoder.prefixes is None and not decoder.rows_kernel
    monkeypatch.setenv("DECODE_ROWS_KERNEL", "cublas")
    with pytest.raises(ValueError, match="DECODE_ROWS_KERNEL must be 1"):
        build_backend(model, tokenizer, fast=True)
    monkeypatch.setenv("DECODE_ROWS_KERNEL", "1")
    monkeypatch.setenv("DECODE_QUEUE_AHEAD", "later")
    with pytest.raises(ValueError, match="DECODE_QUEUE_AHEAD must be 1"):
        build_backend(model, tokenizer, fast=True)
    monkeypatch.setenv("DECODE_PREFILL_TOKENS", "lots")
    with pytest.raises(ValueError, match="DECODE_PREFILL_TOKENS must be a whole number"):
        build_backend(model, tokenizer, fast=True)
    monkeypatch.setenv("DECODE_PREFILL_TOKENS", "0")
    monkeypatch.setenv("DECODE_PREFIXES", "-1")
    with pytest.raises(ValueError, match="DECODE_PREFIXES must be a whole number of prompts"):
        build_backend(model, tokenizer, fast=True)


def test_decode_aoti_switch_builds_the_ahead_of_time_decoder_while_generate_answers(tiny_run, monkeypatch):
    import starsql.serve.fast.aoti as aoti

    model, tokenizer = load_for_inference("tiny-starcoder2", str(tiny_run))
    built = []
    monkeypatch.setattr(aoti, "build_aoti_backend", lambda m, t: built.append(m) or "the AOTI backend")
    monkeypatch.setenv("DECODE_AOTI", "1")
    chosen = build_backend(model, tokenizer, fast=True)
    assert isinstance(chosen, WarmingBackend) and chosen.concurrency == 1
    assert chosen.wait(60) == "the AOTI backend" and built == [model]
    assert not any("Gemv" in type(m).__name__ for m in model.modules())  # the model as loaded is what is exported
    monkeypatch.setenv("DECODE_AOTI", "perhaps")
    with pytest.raises(ValueError, match="DECODE_AOTI must be 1"):
        build_backend(model, tokenizer, fast=True)
