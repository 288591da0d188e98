"""The scheduler's exact decisions on tiny configurations."""

from __future__ import annotations

from workers.engine.kv_cache import KVCacheManager
from workers.engine.request import Request, RequestStatus
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler

_arrivals = iter(range(1000))


def request(request_id: str, prompt_len: int, max_tokens: int = 8) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(
        request_id, list(range(prompt_len)), params, seed=0, arrival_index=next(_arrivals)
    )


def decisions(output):
    return [
        (s.request_id, len(s.token_ids), s.num_computed_tokens, s.block_table, s.sample)
        for s in output.requests
    ]


def run_step(scheduler: Scheduler, token: int = 7):
    output = scheduler.schedule()
    sampled = {s.request_id: token for s in output.requests if s.sample}
    scheduler.update(output, sampled)
    return output


def test_budget_split_and_chunked_prefill():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(kv, max_num_batched_tokens=10, max_num_seqs=3)
    for r in (request("r0", 6), request("r1", 7), request("r2", 3)):
        scheduler.add(r)

    first = run_step(scheduler)
    assert decisions(first) == [("r0", 6, 0, [0, 1], True), ("r1", 4, 0, [2], False)]
    assert first.num_batched_tokens == 10
    assert [r.request_id for r in scheduler.waiting] == ["r2"]

    second = run_step(scheduler)
    assert decisions(second) == [
        ("r0", 1, 6, [0, 1], True),
        ("r1", 3, 4, [2, 3], True),
        ("r2", 3, 0, [4], True),
    ]
    assert second.requests[2].new_request is not None
    assert second.requests[0].new_request is None
    assert scheduler.num_chunked_prefills == 1


def test_max_num_seqs_bounds_the_batch():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(kv, max_num_batched_tokens=100, max_num_seqs=2)
    for name in ("a", "b", "c"):
        scheduler.add(request(name, 3))
    assert [s.request_id for s in run_step(scheduler).requests] == ["a", "b"]


def test_newest_running_request_is_preempted_and_recomputed_later():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(kv, max_num_batched_tokens=16, max_num_seqs=4)
    r0, r1 = request("r0", 4), request("r1", 4)
    scheduler.add(r0)
    scheduler.add(r1)

    assert decisions(run_step(scheduler)) == [("r0", 4, 0, [0], True), ("r1", 4, 0, [1], True)]
    assert decisions(run_step(scheduler)) == [
        ("r0", 1, 4, [0, 2], True),
        ("r1", 1, 4, [1, 3], True),
    ]
    for _ in range(3):  # positions 5, 6, 7 fit in two blocks
        run_step(scheduler)
    assert kv.pool.num_free_blocks == 0

    # r0 needs a third block: r1, the newest, gives back its blocks (tail first)
    step = run_step(scheduler)
    assert step.preempted_request_ids == ["r1"]
    assert decisions(step) == [("r0", 1, 8, [0, 2, 3], True)]
    assert r1.status == RequestStatus.WAITING and r1.num_computed_tokens == 0
    assert len(r1.output_token_ids) == 5 and list(scheduler.waiting) == [r1]

    # r1 needs three blocks to recompute its 9 tokens: one is free, so it waits
    assert decisions(run_step(scheduler)) == [("r0", 1, 9, [0, 2, 3], True)]
    next_step = scheduler.schedule()
    assert next_step.finished_request_ids == []
    assert [s.request_id for s in next_step.requests] == ["r0"]
    scheduler.update(next_step, {"r0": 7})
    scheduler.finish(r0, RequestStatus.FINISHED_LENGTH)

    resumed = scheduler.schedule()
    # r0 gave back 3, 2, 0 (tail first) behind the free block 1
    assert decisions(resumed) == [("r1", 9, 0, [1, 3, 2], True)]
    assert resumed.finished_request_ids == ["r0"]
    assert resumed.requests[0].new_request.output_token_ids == [7] * 5


def test_a_request_that_can_never_fit_fails_alone():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=4)
    huge, small = request("huge", 14, max_tokens=4), request("small", 3)
    scheduler.add(huge)
    scheduler.add(small)
    assert decisions(run_step(scheduler)) == [("small", 3, 0, [0], True)]
    assert huge.status == RequestStatus.FINISHED_ERROR
    assert "needs 5 KV blocks" in huge.error and scheduler.errored == [huge]
