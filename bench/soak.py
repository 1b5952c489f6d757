"""Soak: continuous sessions on one hosted-mode server for minutes; errors, wrong results, memory.

Starts the app as it is served (``moe-viz app``: model loaded and warm before the server is ready)
on loopback in hosted mode (``HOSTED_ENV``: 512-token prompts, 2 compute slots, 1 torch thread)
and runs rounds of concurrent sessions over Streamlit's websocket protocol until the time is up.
The sessions cycle through prompts from a few tokens up to the 512-token limit, every sidebar
mode on the Explore page (``native`` there is the sidebar's default, top-k at the model's k) and
the Compare page (native routing against its three default policies). Every
Explore session's "Run summary:" line must equal a single-session reference computed in this
process; every Compare session must show the reference's per-policy headings, routing-diff and
mode-effect explanations and drop counts. Errors: exceptions, unfinished runs, error or warning
alerts, client failures.

The server's RSS is sampled every 10 s; a line fitted to the samples after the warm-up gives the
slope in % per minute (of the window's mean RSS). Streamlit keeps up to 128 disconnected sessions,
each for ``server.disconnectedSessionTTL`` (120 s), before it may free them
(``MemorySessionStorage``), so the soak's RSS includes up to 128 recently closed sessions, as in
production; the warm-up covers their filling up.

RSS per live session is measured afterwards on a fresh server of the same settings: after the
soak the allocator holds hundreds of MiB of freed memory that new sessions reuse without growing
the RSS (it swings by that much between samples), which hides a few MiB per session. The fresh
server serves two sessions (imports and first-run caches), then ``--held`` sessions are opened and
kept connected: (RSS with them live - RSS just before, each the median of 5 samples 1 s apart) /
held. Beside it, the bytes one such session's trace holds (``Trace.nbytes``, what the session
budget counts), computed in this process.

    python bench/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from load_scenarios import HOSTED_ENV, MODEL, SUBJECTS, query  # noqa: E402
from streamlit_client import Server, SessionResult, held_sessions, run_sessions  # noqa: E402

from moe_viz import MoEModel, load_model, parse_policy, run_prompt, views  # noqa: E402

MAX_TOKENS = 512  # hosted mode's prompt limit (MOE_VIZ_MAX_PROMPT_TOKENS)
MAX_CHARS = 4000  # hosted mode's prompt characters (the app cuts a link's prompt there)
LENGTHS = [6, 40, 128, 256, 384, MAX_TOKENS]  # tokens
EXPLORE_POLICIES = [
    "native",
    "top-k:1",
    "top-k:2",
    "top-k:3",
    "capacity:0.5:position",
    "capacity:1:probs",
    "capacity:1.25:position",
    "ensemble:gate",
    "ensemble:uniform",
]
COMPARE_EVERY = 5  # every fifth session is on the Compare page
JOBS = 90  # distinct sessions before the cycle repeats: lcm(6 lengths, 9 policies, 5)
PROSE = (
    "The river wound slowly through the valley, past farms and quiet villages. "
    "She opened the letter by the window and read it twice before smiling. "
    "In the spring the town held a market where everyone sold bread and honey. "
)


@dataclass(frozen=True)
class Job:
    """One session: a prompt of ``tokens`` tokens, a policy (Explore) or the Compare page."""

    prompt: str
    tokens: int
    policy: str
    page: str  # "" (Explore, the default page) or "compare"

    @property
    def query(self) -> str:
        return query(self.prompt, self.policy)


def prompt_of(model: MoEModel, i: int, tokens: int) -> str:
    """A distinct prompt of exactly ``tokens`` tokens (at most), by cutting a long text."""
    rotated = SUBJECTS[i % len(SUBJECTS) :] + SUBJECTS[: i % len(SUBJECTS)]
    text = f"#{i} " + " ".join(rotated) + " " + PROSE * 40

    def count(n: int) -> int:
        return len(model.tokenizer(text[:n])["input_ids"])

    low, high = 1, min(len(text), MAX_CHARS)  # the longest prefix with at most ``tokens`` tokens
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count(mid) <= tokens else (low, mid - 1)
    return text[:low]


def make_jobs(model: MoEModel) -> list[Job]:
    jobs = []
    for i in range(JOBS):
        tokens = LENGTHS[i % len(LENGTHS)]
        page = "compare" if i % COMPARE_EVERY == COMPARE_EVERY - 1 else ""
        policy = "native" if page else EXPLORE_POLICIES[i % len(EXPLORE_POLICIES)]
        jobs.append(Job(prompt_of(model, i, tokens), tokens, policy, page))
    return jobs


def expected_texts(model: MoEModel, job: Job) -> list[str]:
    """What a single session must show: the run summary (Explore), or every policy's heading,
    drop count, routing-diff and mode-effect explanations (Compare, its default policies)."""
    if not job.page:
        spec = f"top-k:{model.top_k}" if job.policy == "native" else job.policy  # the sidebar's default mode
        return [views.run_summary(run_prompt(model, job.prompt, parse_policy(spec)))]
    layer = model.moe_layers[0]  # the sidebar's default layer
    native = run_prompt(model, job.prompt, None)
    texts = []
    for spec in (f"top-k:{model.top_k}", "capacity:1.0", "ensemble:gate"):  # compare.py's defaults
        trace = run_prompt(model, job.prompt, parse_policy(spec))
        texts.append(f"#### `{trace.policy}`")
        texts.append(f"Dropped assignments (all layers): {sum(lt.dropped_count for lt in trace.layers)}")
        texts.extend(view.explanation for view in views.compare_views(native, trace, layer))
    return texts


def references(model: MoEModel, jobs: list[Job]) -> list[list[str]]:
    """Single-session references, with the server's torch thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(HOSTED_ENV["MOE_VIZ_TORCH_THREADS"]))
    try:
        return [expected_texts(model, job) for job in jobs]
    finally:
        torch.set_num_threads(before)


def missing(result: SessionResult, want: list[str]) -> str | None:
    """The first expected text the session did not show (None: it showed them all)."""
    bodies = {body for _, body in result.texts}
    return next((text for text in want if text not in bodies), None)


def failed(result: SessionResult) -> list[str]:
    """Why a session failed (empty when it did not): exceptions, alerts, an unfinished run."""
    reasons = list(result.exceptions)
    reasons += [f"{kind}: {body}" for kind, body in result.texts if kind in ("error", "warning")]
    if not result.finished:
        reasons.append("the script run did not finish")
    return reasons


class RssSampler(threading.Thread):
    """The server process's RSS every ``every`` seconds, as (seconds since start, MiB)."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def rss(self) -> float:
        return self.process.memory_info().rss / 2**20

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, self.rss()))
            self.stop.wait(self.every)


def steady_rss(sampler: RssSampler, samples: int = 5) -> float:
    """The median of ``samples`` RSS readings 1 s apart (MiB)."""
    readings = []
    for i in range(samples):
        readings.append(sampler.rss())
        if i < samples - 1:
            time.sleep(1.0)
    return statistics.median(readings)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of continuous sessions")
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes left out of the RSS fit")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions per round")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--held", type=int, default=32, help="sessions kept live on a fresh server for RSS per session")
    args = parser.parse_args()

    print("building prompts and single-session references ...", file=sys.stderr, flush=True)
    model = load_model(MODEL)
    jobs = make_jobs(model)
    expected = references(model, jobs)
    held = [Job(prompt_of(model, 1000 + i, 256), 256, EXPLORE_POLICIES[i % 9], "") for i in range(args.held)]
    held_expected = references(model, held)
    trace_mib = run_prompt(model, held[0].prompt, parse_policy(held[0].policy)).nbytes() / 2**20

    errors: list[str] = []
    wrong_results: list[str] = []
    latencies: dict[str, list[float]] = {"explore": [], "compare": []}
    sessions = rounds = 0
    with Server(env=HOSTED_ENV, launcher=True) as server:
        assert server.proc is not None
        sampler = RssSampler(server.proc.pid, args.sample)
        sampler.start()
        deadline = sampler.t0 + args.minutes * 60
        print(f"soaking for {args.minutes:g} min, {args.sessions} sessions a round ...", file=sys.stderr, flush=True)
        while time.perf_counter() < deadline:
            batch = [(i % len(jobs)) for i in range(sessions, sessions + args.sessions)]
            results = asyncio.run(
                run_sessions(server.port, [jobs[i].query for i in batch], pages=[jobs[i].page for i in batch])
            )
            for i, result in zip(batch, results):
                job = jobs[i]
                what = f"{job.page or 'explore'} {job.policy} {job.tokens} tokens"
                latencies[job.page or "explore"].append(result.seconds)
                reasons = failed(result)
                if reasons:
                    errors.append(f"{what}: {'; '.join(reasons)[:300]}")
                elif (absent := missing(result, expected[i])) is not None:
                    got = result.find("Run summary:") or result.find("#### ")
                    wrong_results.append(f"{what}: missing {absent[:160]!r}; shown e.g. {(got or '')[:160]!r}")
            sessions += len(batch)
            rounds += 1
            if rounds % 10 == 0:
                t = time.perf_counter() - sampler.t0
                print(
                    f"  {t / 60:5.1f} min  {sessions} sessions  errors {len(errors)}  wrong {len(wrong_results)}"
                    f"  RSS {sampler.samples[-1][1]:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        soak_s = time.perf_counter() - sampler.t0
        sampler.stop.set()
        sampler.join()

    print(f"RSS per live session: a fresh server, {len(held)} sessions held ...", file=sys.stderr, flush=True)
    with Server(env=HOSTED_ENV, launcher=True) as fresh:
        assert fresh.proc is not None
        probe = RssSampler(fresh.proc.pid, args.sample)
        warm = asyncio.run(run_sessions(fresh.port, [job.query for job in held[:2]]))
        errors += [f"warm-up session: {'; '.join(failed(r))[:300]}" for r in warm if failed(r)]
        time.sleep(2)
        before = steady_rss(probe)

        async def measure_held() -> tuple[float, list[SessionResult]]:
            async with held_sessions(fresh.port, [(job.query, job.page) for job in held]) as results:
                await asyncio.sleep(2)
                return await asyncio.to_thread(steady_rss, probe), results

        with_held, held_results = asyncio.run(measure_held())
    for job, result, want in zip(held, held_results, held_expected):
        reasons = failed(result)
        if reasons:
            errors.append(f"held {job.policy}: {'; '.join(reasons)[:300]}")
        elif (absent := missing(result, want)) is not None:
            wrong_results.append(f"held {job.policy}: missing {absent[:160]!r}; got {result.find('Run summary:')!r}")

    samples = sampler.samples
    window = [(t / 60, rss) for t, rss in samples if t >= args.warmup * 60]
    mib_per_min = slope(window) if len(window) >= 2 else float("nan")
    pct_per_min = 100 * mib_per_min / statistics.fmean(r for _, r in window) if window else float("nan")
    per_session = (with_held - before) / max(1, len(held))

    def p(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")

    print(f"\nsoak {soak_s / 60:.1f} min on hosted mode, model {Path(MODEL).name}, {args.sessions} sessions a round")
    print(
        f"sessions {sessions} in {rounds} rounds: explore {len(latencies['explore'])}, compare "
        f"{len(latencies['compare'])}; prompts {LENGTHS} tokens; Explore policies {', '.join(EXPLORE_POLICIES)}"
    )
    for page, values in latencies.items():
        print(
            f"  {page:8s} latency p50 {p(values, 0.5):6.2f} s   p95 {p(values, 0.95):6.2f} s   max {p(values, 1):6.2f} s"
        )
    print(f"errors {len(errors)}   wrong results {len(wrong_results)}")
    for line in (errors + wrong_results)[:10]:
        print(f"  {line}")
    print(f"RSS samples every {args.sample:g} s (min: MiB):")
    for k in range(0, len(samples), 8):
        print("  " + "  ".join(f"{t / 60:4.1f}: {rss:6.1f}" for t, rss in samples[k : k + 8]))
    print(
        f"RSS start {samples[0][1]:.1f} MiB, end {samples[-1][1]:.1f} MiB; after the {args.warmup:g}-min warm-up "
        f"{len(window)} samples, slope {mib_per_min:+.2f} MiB/min = {pct_per_min:+.3f} % per minute"
    )
    print(
        f"RSS per live session (a fresh server): ({with_held:.1f} MiB with {len(held)} sessions connected - "
        f"{before:.1f} MiB just before) / {len(held)} = {per_session:.2f} MiB  (each one Explore run of a "
        f"256-token prompt; its trace holds {trace_mib:.2f} MiB)"
    )
    ok = not errors and not wrong_results and pct_per_min < 1.0
    print(f"goal: 0 errors, 0 wrong results, slope < 1 % per minute: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
