"""The in-process engine: add_request / step / abort, and `generate` on top of them.

Usable without Ray: tests, benchmarks and `afs generate` drive it directly; a replica's rank-0
worker runs the same step loop.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections.abc import Sequence

from workers.config import EngineConfig
from workers.distributed import (
    Lockstep,
    destroy_tensor_parallel,
    get_tp_size,
    init_tensor_parallel,
    set_lockstep,
    tp_broadcast_object,
    tp_broadcast_tensor,
)
from workers.engine.kv_cache import KVCacheManager
from workers.engine.outputs import (
    Completion,
    GenerationResult,
    RequestOutput,
    TextStream,
    Usage,
)
from workers.engine.request import Request, RequestStatus, check_prompt_fits, check_prompt_ids
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.warm_up import plan as warm_up_plan
from workers.worker import (
    ShardWorker,
    check_tensor_parallel,
    follow_child,
    free_rendezvous,
    rank_device,
    shutdown_followers,
)


class LLMEngine:
    """The engine of one replica: rank 0 of its tensor-parallel group.

    With `tp > 1` and no `rendezvous`, it spawns ranks 1..tp-1 as processes of its own and joins
    them over 127.0.0.1; a cluster passes the `rendezvous` of ranks it placed itself.
    """

    def __init__(
        self, config: EngineConfig | None = None, rendezvous: str | None = None, **overrides
    ) -> None:
        config = config or EngineConfig(**overrides)
        self.config = config
        check_tensor_parallel(config)
        self.device = rank_device(config, 0)
        self._followers: list = []
        if config.tp > 1:
            if rendezvous is None:
                rendezvous = free_rendezvous()
                context = multiprocessing.get_context("spawn")
                for rank in range(1, config.tp):
                    process = context.Process(
                        target=follow_child, args=(config, rank, rendezvous), daemon=True
                    )
                    process.start()
                    self._followers.append(process)
            init_tensor_parallel(0, config.tp, rendezvous, self.device)
        worker = ShardWorker(config, self.device, sampler=True)
        loaded = worker.loaded
        self.model, self.model_config, self.tokenizer = (
            loaded.model,
            loaded.config,
            loaded.tokenizer,
        )
        self.source, self.load_seconds = loaded.source, loaded.load_seconds
        self.max_model_len = worker.max_model_len
        self.eos_token_ids = worker.eos_token_ids
        self.runner = worker.runner
        self.num_kv_blocks = worker.num_kv_blocks
        self._new_schedule_state()
        self._seeds = random.Random(config.seed)
        self._arrivals = 0
        self._streams: dict[str, TextStream] = {}
        self._prompt_logprobs: dict[str, list] = {}
        self._finished_outputs: list[RequestOutput] = []
        self._children: dict[str, list[Request]] = {}
        self.async_scheduling = (
            config.async_scheduling
            if config.async_scheduling is not None
            else self.device.type == "cuda"
        )
        self._in_flight = None  # (schedule, StepInFlight) of a step queued ahead
        self.warm_up_report: dict | None = None
        if config.resolved_warm_up(self.device):
            try:
                self.warm_up_report = self.warm_up()
            except BaseException:
                self.shutdown()  # the other ranks stop too, rather than wait for a step
                raise
        if get_tp_size() > 1:  # every rank compiled what serving reaches: no more lockstep
            tp_broadcast_object(Lockstep(False))
            set_lockstep(False)

    def shutdown(self) -> None:
        """Stop the tensor-parallel followers (and wait for the ones this engine spawned).

        Tearing down an NCCL group is collective: each follower's teardown waits for this
        rank's, so this rank tears its own down before it waits for them to exit (in a thread,
        so that a follower stuck in a collective its peer never joined cannot hold it for good).
        """
        if self.config.tp > 1 and get_tp_size() > 1:
            shutdown_followers()
            teardown = threading.Thread(target=destroy_tensor_parallel, daemon=True)
            teardown.start()
            teardown.join(30)
            for process in self._followers:
                process.join(30)
                if process.is_alive():  # stuck (a collective its peer never joined): stop it
                    process.kill()

    def _new_schedule_state(self) -> None:
        """An empty KV block pool and prefix cache, and a scheduler over them with no request
        and its counters at zero."""
        config = self.config
        self.kv = KVCacheManager(
            self.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.kv, config.token_budget(self.device), config.max_num_seqs)

    def warm_up(self) -> dict:
        """Run workers/engine/warm_up.py's requests through the engine, so that the kernels every
        kind of step needs are compiled before a real request arrives, and leave nothing of them
        behind: the KV blocks, the prefix cache, the counters and the seeds handed to requests
        are as before. Returns {waves, requests, steps, seconds}; a warm-up request that fails
        raises RuntimeError (the engine is not fit to serve)."""
        start = time.perf_counter()
        config = self.config
        seeds, arrivals = self._seeds.getstate(), self._arrivals
        vocab = self.model_config.vocab_size
        if self.tokenizer is not None:  # prompts the tokenizer can decode
            vocab = min(vocab, self.tokenizer.vocab_size)
        waves = warm_up_plan(
            vocab,
            self.max_model_len,
            config.token_budget(self.device),
            config.block_size,
            config.max_num_seqs,
            config.enable_prefix_caching,
            self.num_kv_blocks * config.block_size,
        )
        steps = requests = 0
        for w, wave in enumerate(waves):
            pending = sorted(enumerate(wave), key=lambda item: item[1].after_steps)
            wave_steps = 0
            while pending or self.has_unfinished_requests():
                while pending and pending[0][1].after_steps <= wave_steps:
                    index, arrival = pending.pop(0)
                    self.add_request(arrival.prompt, arrival.params, f"warm-up-{w}-{index}")
                    requests += 1
                for output in self.step():
                    if output.error is not None:
                        raise RuntimeError(f"warm-up request {output.request_id}: {output.error}")
                wave_steps += 1
            steps += wave_steps
        self.step()  # hands the last finished ids to every rank's runner, which drops them
        self._seeds.setstate(seeds)
        self._arrivals = arrivals
        self._in_flight = None
        self._new_schedule_state()
        return {
            "waves": len(waves),
            "requests": requests,
            "steps": steps,
            "seconds": round(time.perf_counter() - start, 3),
        }

    # -- requests --

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return check_prompt_ids(prompt, self.model_config.vocab_size)

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        resume_output_ids: Sequence[int] = (),
    ) -> str:
        """Queue a request; bad input raises ValueError and queues nothing.

        `resume_output_ids` continues a completion that another engine started (failover): they
        count as output already produced, so positions, max_tokens and seeded draws go on as if
        nothing had happened.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params: must be a SamplingParams")
        params.validate_for_vocab(self.model_config.vocab_size)
        token_ids = self.tokenize(prompt)
        check_prompt_fits(len(token_ids), params.max_tokens, self.max_model_len)
        if resume_output_ids and params.n != 1:
            raise ValueError("resume_output_ids: only a request with n == 1 can be resumed")
        resumed = self.tokenize(list(resume_output_ids)) if resume_output_ids else []
        if len(resumed) >= params.max_tokens:
            raise ValueError(
                f"resume_output_ids: {len(resumed)} tokens already reach "
                f"max_tokens={params.max_tokens}"
            )
        if request_id is None:
            request_id = f"req-{self._arrivals}"
        if request_id in self._children:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        base_seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        children: list[Request] = []
        for index in range(params.n):
            child = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{index}",
                prompt_token_ids=token_ids,
                params=params,
                seed=(base_seed + index) % (1 << 63),
                arrival_index=self._arrivals,
                parent_id=request_id,
                index=index,
                leader=children[0] if children else None,
                output_token_ids=list(resumed),
            )
            self._arrivals += 1
            children.append(child)
            tokenizer = self.tokenizer if self.config.detokenize else None
            self._streams[child.request_id] = TextStream(tokenizer, params, token_ids + resumed)
            self.scheduler.add(child)
        self._children[request_id] = children
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request (all its n completions); its blocks go back to the pool now."""
        for child in self._children.get(request_id, ()):
            if not child.status.finished:
                self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
                self._finished_outputs.append(self._output(child, [], None))
        if not self.scheduler.running:
            self._in_flight = None  # a step queued ahead for requests that are all gone

    def fail_all(self, error: str) -> list[RequestOutput]:
        """After a step raised: every unfinished request ends with the error; the engine goes on."""
        self._in_flight = None
        outputs = []
        for request in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR, error)
            outputs.append(self._output(request, [], None))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished_outputs)

    # -- the step --

    def step(self) -> list[RequestOutput]:
        outputs, self._finished_outputs = self._finished_outputs, []
        if self._in_flight is not None:  # queued by the last step, before its ids were known
            (schedule, step), self._in_flight = self._in_flight, None
        else:
            schedule = self.scheduler.schedule()
            tp_broadcast_object(schedule)  # the other ranks run the same step over their shards
            for request in self.scheduler.errored:
                outputs.append(self._output(request, [], None))
            self.scheduler.errored.clear()
            step = self.runner.sample(self.runner.forward(schedule))
        ahead = None
        if self.async_scheduling:
            # the next decode step goes to the GPU now, reading this step's draw there, so that
            # the host's work below overlaps it instead of leaving the GPU idle
            ahead_schedule = self.scheduler.schedule_ahead(schedule)
            if ahead_schedule is not None:
                # the other ranks get the rows now and the draw on the device, after the sampler
                tp_broadcast_object(ahead_schedule)
                ids = tp_broadcast_tensor(step.token_ids)
                ahead = ahead_schedule, self.runner.forward(ahead_schedule, ids)
        result = self.runner.collect(step)
        for request_id, (start, logprobs) in result.prompt_logprobs.items():
            # entry p + 1 scores prompt token p + 1; a preempted request recomputes its prompt,
            # and the positions already held are not added twice
            entries = self._prompt_logprobs.setdefault(request_id, [None])
            entries.extend(logprobs[len(entries) - 1 - start :])
        for request in self.scheduler.update(schedule, result.sampled):
            token = request.output_token_ids[-1]
            stream = self._streams[request.request_id]
            # stop tokens and stop strings count only once min_tokens tokens are out
            can_stop = len(request.output_token_ids) > request.params.min_tokens
            stop = self._token_stop(request, token) if can_stop else None
            if stream.add([token], can_stop) and stop is None:
                stop = (RequestStatus.FINISHED_STOPPED, stream.stop_reason)
            if stop is None and len(request.output_token_ids) >= request.params.max_tokens:
                stop = (RequestStatus.FINISHED_LENGTH, None)
            if stop is not None:
                self.scheduler.finish(request, stop[0])
                stream.stop_reason = stop[1]
            logprobs = result.logprobs.get(request.request_id)
            outputs.append(self._output(request, [token], logprobs))
        if ahead is not None and self.scheduler.running:
            # sampled now, from states that hold this step's tokens (penalties, positions);
            # rows of requests that stopped above are drawn and dropped by `update`
            self._in_flight = ahead[0], self.runner.sample(ahead[1])
        return outputs

    def _token_stop(self, request: Request, token: int) -> tuple[RequestStatus, int] | None:
        params = request.params
        if (
            token in self.eos_token_ids and not params.ignore_eos
        ) or token in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token
        return None

    def _output(self, request: Request, new_tokens: list[int], logprobs) -> RequestOutput:
        finished = request.status.finished
        stream = self._streams[request.request_id]
        if finished:
            stream.finish()
            self._streams.pop(request.request_id)
        # prompt logprobs go out once: with the first token, or at the end if none came
        prompt_logprobs = None
        first_output = len(request.output_token_ids) == len(new_tokens)
        if request.params.prompt_logprobs is not None and first_output:
            prompt_logprobs = self._prompt_logprobs.get(request.request_id)
        if finished:
            self._prompt_logprobs.pop(request.request_id, None)
        output = RequestOutput(
            request_id=request.parent_id or request.request_id,
            index=request.index,
            new_token_ids=new_tokens,
            text_delta=stream.delta(finished),
            finished=finished,
            finish_reason=request.status.value if finished else None,
            usage=Usage(
                request.num_prompt_tokens, len(request.output_token_ids), request.num_cached_tokens
            ),
            logprobs=[logprobs] if logprobs is not None else None,
            prompt_logprobs=prompt_logprobs,
            stop_reason=stream.stop_reason,
            error=request.error,
        )
        if finished and all(c.status.finished for c in self._children[output.request_id]):
            del self._children[output.request_id]
        return output

    # -- the convenience --

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Run prompts to completion; a bad prompt gets an error result, the others go on.

        Drains the engine: outputs of requests added earlier through add_request are dropped.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} given for {len(prompts)} prompts")
        results: list[GenerationResult] = []
        by_id: dict[str, GenerationResult] = {}
        for prompt, request_params in zip(prompts, params, strict=True):
            try:
                request_id = self.add_request(prompt, request_params)
            except ValueError as error:
                failed = Completion(0, "", [], "error", error=str(error))
                results.append(GenerationResult("", [], [failed]))
                continue
            prompt_ids = self._children[request_id][0].prompt_token_ids
            result = GenerationResult(
                request_id,
                prompt_ids,
                [Completion(i, "", [], None) for i in range(request_params.n)],
            )
            results.append(result)
            by_id[request_id] = result
        while self.has_unfinished_requests():
            for output in self.step():
                result = by_id.get(output.request_id)
                if result is None:
                    continue
                completion = result.completions[output.index]
                completion.text += output.text_delta
                completion.token_ids += output.new_token_ids
                if output.logprobs is not None:
                    completion.logprobs = (completion.logprobs or []) + output.logprobs
                if output.prompt_logprobs is not None:
                    result.prompt_logprobs = output.prompt_logprobs
                if output.finished:
                    completion.finish_reason = output.finish_reason
                    completion.stop_reason = output.stop_reason
                    completion.error = output.error
                    result.usage = output.usage
        return results

    def stats(self) -> dict[str, float]:
        """Counters for metrics and benchmarks."""
        return {
            "num_kv_blocks": self.num_kv_blocks,
            "free_kv_blocks": self.kv.pool.num_free_blocks,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "chunked_prefills": self.scheduler.num_chunked_prefills,
            "prefix_hit_rate": self.kv.prefix_hit_rate,
        }
