"""Load test of `hashray serve` on loopback at 10^6-10^8 codes, beside faiss alone on the same codes.

Writes N random codes (default 1,000,000 x 64 bits; :mod:`serve_inputs`), an
untrained model and a small dataset dir, starts the Serve app on 127.0.0.1
through ``build_app`` and measures what a user sees: the load time, each
replica's resident memory, QPS/p50/p99 of C closed-loop clients on
``GET /search/{id}``, ``POST /search`` and radius queries. Then, with the
server gone, it searches one faiss ``IndexBinaryFlat`` over the same codes in
batches of C queries (what the ingress sends each shard), checks served
answers against it, times the shards' own scan against it in-process, and
times faiss's multi-index hashing and the shards' scan against faiss's flat
scan for radius queries (:mod:`serve_faiss`).

    python bench/serve_load.py [--codes 1000000] [--clients 8] [--seconds 15] [--shards N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import ray
import serve_client as client
import serve_faiss
import serve_inputs
from ray import serve

from serve.api import MAX_K
from serve.app import build_app
from serve.config import ServeConfig
from serve.resources import shard_count
from serve.start import use_fast_http

TARGETS = {
    "errors": 0,
    "p50_ms_1m": 20.0,
    "p99_ms_1m": 100.0,
    "p99_over_p50": 4.0,
    "served_over_faiss_10m": 0.7,
    "rss_over_share": 1.5,
    "ours_over_faiss": 0.8,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", type=int, default=1_000_000, help="database size (10^8 fits 24 GiB)")
    parser.add_argument("--bits", type=int, default=64, help="code length")
    parser.add_argument("--row-group", type=int, default=1_000_000, help="rows per Parquet row group and write chunk")
    parser.add_argument(
        "--shards",
        type=int,
        default=ServeConfig.shards,
        help="index shard replicas (default: as `hashray serve`, one per 2M codes and at most one per core)",
    )
    parser.add_argument(
        "--shard-threads", type=int, default=ServeConfig.shard_threads, help="scan threads per shard replica"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=15.0, help="load time per endpoint")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--radii", default="0,3,6", help="radii of the served GET /search/{id}?radius=r runs")
    parser.add_argument("--radius-seconds", type=float, default=3.0, help="load time per served radius")
    parser.add_argument("--check-ids", type=int, default=20, help="served answers checked against brute force")
    parser.add_argument("--faiss-seconds", type=float, default=5.0, help="time per faiss-alone thread count")
    parser.add_argument("--index-queries", type=int, default=288, help="queries of the in-process ours-vs-faiss timing")
    parser.add_argument(
        "--index-threads",
        type=int,
        default=1,
        help="threads of the ours-vs-faiss timing, each side (a shard's default)",
    )
    parser.add_argument(
        "--multihash-sizes", default="1000000,10000000", help="database prefixes of the multi-hash vs scan timing"
    )
    parser.add_argument("--multihash-radii", default="0,1,2,3,4,5,6", help="radii of the multi-hash vs scan timing")
    parser.add_argument("--multihash-queries", type=int, default=100, help="queries of the multi-hash vs scan timing")
    parser.add_argument("--nhash", default="2,4", help="multi-hash table counts to time (tables of bits/nhash bits)")
    parser.add_argument("--image-size", type=int, default=64, help="model input size for POST /search")
    parser.add_argument("--port", type=int, default=8321, help="loopback port")
    parser.add_argument("--workdir", default=None, help="where the temporary dirs go (default: the system's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser.parse_args()


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def verdict(value: float, target: float, *, at_most: bool = True) -> str:
    """``(target <= 4) met``: the target beside a figure, as the TARGETS line used to say it."""
    met = value <= target if at_most else value >= target
    return f"(target {'<=' if at_most else '>='} {target:g}) {'met' if met else 'NOT met'}"


def own_memory() -> str:
    """This process's resident and peak memory, to show the generator stayed small."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return f"VmRSS {int(status['VmRSS'].split()[0]) / 1024:.0f} MiB, VmHWM {int(status['VmHWM'].split()[0]) / 1024:.0f} MiB"


def replica_rss(app_name: str) -> list[tuple[str, int, int]]:
    """(deployment, pid, VmRSS bytes) of every Serve replica of ``app_name``, found by process title.

    Ray titles a replica's worker ``ray::ServeReplica:<app>:<deployment>`` (a
    method name is appended while it runs one); psutil is not a dependency.
    """
    marker = f"ServeReplica:{app_name}:"
    found = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker not in title:
                continue
            rss = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue  # not a process, or it ended meanwhile
        deployment = title.split(marker, 1)[1].split()[0].split(".")[0]
        found.append((deployment, int(proc.name), int(rss.split()[1]) * 1024))
    return sorted(found)


def print_memory(app_name: str, *, count: int, bits: int, shards: int) -> float:
    """Print every replica's RSS; for shards also RSS / share of (codes + ids) bytes. Returns the worst shard ratio."""
    share = (count * bits // 8 + serve_inputs.ids_bytes(count)) / shards
    print(f"resident memory per replica (share of codes + ids per shard: {share / 2**20:.0f} MiB):")
    worst = 0.0
    replicas = replica_rss(app_name)
    # The catalog runs the same Ray, Serve and pyarrow imports as a shard and holds no rows: a replica's floor.
    floor = min((rss for deployment, _, rss in replicas if deployment == "Catalog"), default=0)
    for deployment, pid, rss in replicas:
        line = f"  {deployment:<12} pid {pid:<8} VmRSS {rss / 2**20:8.0f} MiB"
        if deployment.startswith("IndexShard"):
            worst = max(worst, rss / share)
            line += f"   {rss / share:5.2f} x its share {verdict(rss / share, TARGETS['rss_over_share'])}"
            line += f"; above the catalog's floor: {(rss - floor) / share:5.2f} x"
        elif deployment == "Ingress":
            line += f"   {rss / (share * shards):5.2f} x all codes + ids (it holds no codes: the shards look ids up)"
        print(line)
    return worst


def served_answers(port: int, positions: list[int], k: int) -> dict[int, tuple[list[int], list[int]]]:
    """GET /search/{id} of the items at ``positions``: query position -> (result positions, distances)."""
    paths = [f"/search/{serve_inputs.item_id(p)}?k={k}" for p in positions]
    answers = asyncio.run(client.get_json(port, paths))
    return {
        p: ([int(r["id"][len(serve_inputs.ID_PREFIX) :]) for r in a["results"]], [r["distance"] for r in a["results"]])
        for p, a in zip(positions, answers)
    }


def run_loads(args: argparse.Namespace, images: list[bytes]) -> dict[str, tuple[float, float, float, int]]:
    """Every endpoint under ``args.clients`` closed-loop clients: name -> (QPS, p50, p99, errors)."""

    def by_id(suffix: str = "") -> Callable[[random.Random], bytes]:
        return lambda rng: client.http_request(
            "GET", f"/search/{serve_inputs.item_id(rng.randrange(args.codes))}?k={args.k}{suffix}"
        )

    uploads = [client.multipart_image(image) for image in images]

    def post_image(rng: random.Random) -> bytes:
        return client.http_request("POST", f"/search?k={args.k}", *rng.choice(uploads))

    def run(name: str, request: Callable[[random.Random], bytes], seconds: float) -> None:
        results[name] = client.report(name, *asyncio.run(client.load(args.port, args.clients, seconds, request)))

    results: dict[str, tuple[float, float, float, int]] = {}
    print(f"{args.clients} clients, {args.seconds:g} s per endpoint, k={args.k}")
    run("GET /search/{id}", by_id(), args.seconds)
    run("POST /search", post_image, args.seconds)
    for radius in ints(args.radii):
        run(f"GET /search/{{id}} r={radius}", by_id(f"&radius={radius}"), args.radius_seconds)
    # The floor under every endpoint: the HTTP front and the ingress with no backend call (the static page).
    run("GET / (HTTP floor)", lambda rng: client.http_request("GET", "/"), min(args.seconds, 5.0))
    return results


def http_benchmark(args: argparse.Namespace, run: str, codes_dir: str, data: str, images: list[bytes]) -> dict:
    """Start the app through build_app, measure load time, memory, every endpoint; served answers to check."""
    cfg = ServeConfig(
        run=run,
        codes=codes_dir,
        data=data,
        shards=args.shards,
        shard_threads=args.shard_threads,
        port=args.port,
        encoder_cpus=0.5,
        shard_cpus=0.25,
        ingress_cpus=0.25,
        app_name=f"hashray-bench-{os.getpid()}",  # its replicas' process titles name it: no other server's count
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    started = time.perf_counter()
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    running = time.perf_counter() - started
    asyncio.run(client.first_answer(args.port, "/healthz", timeout_s=120))
    print(
        f"load time: {time.perf_counter() - started:.1f} s from serve.run to the first answer "
        f"(serve.run returned after {running:.1f} s; {args.shards} shards, {args.codes:,} codes)"
    )
    worst_rss = print_memory(cfg.app_name, count=args.codes, bits=args.bits, shards=args.shards)
    loads = run_loads(args, images)
    positions = random.Random(args.seed + 2).sample(range(args.codes), min(args.check_ids, args.codes))
    answers = served_answers(args.port, positions, args.k)
    serve.delete(cfg.app_name)
    return {"loads": loads, "answers": answers, "worst_rss": worst_rss}


def compare(args: argparse.Namespace, codes_dir: str, served: dict) -> tuple[float, int]:
    """With the server gone: faiss alone on the same codes and batches, exactness, ours vs faiss, radius search.

    Returns (served / faiss alone QPS, served answers that differ from brute force).
    """
    codes = serve_faiss.read_codes(codes_dir)
    flat = serve_faiss.flat_index(codes)
    queries = codes[np.random.default_rng(args.seed + 1).integers(0, len(codes), size=max(args.index_queries, 64))]
    cores = len(os.sched_getaffinity(0))
    threads = list(dict.fromkeys([cores, args.shards * args.shard_threads]))
    alone = serve_faiss.faiss_alone(
        flat, queries, batch=args.clients, k=args.k, seconds=args.faiss_seconds, threads=threads
    )
    qps, p50, p99, errors = served["loads"]["GET /search/{id}"]
    print(f"faiss alone, one IndexBinaryFlat in-process, batches of {args.clients} queries, k={args.k}:")
    for count, value in alone.items():
        which = "the machine's cores" if count == cores else "what the serving shards get in all"
        print(f"  {count} faiss threads ({which}): {value:8.1f} QPS   served / faiss alone {qps / value:5.2f}")
    best = max(alone, key=alone.get)  # the stricter comparison: faiss with its better thread count
    ratio = qps / alone[best]
    print(
        f"served GET /search/{{id}} QPS / faiss alone QPS (the better of the two: {best} threads): {ratio:.2f} "
        f"{verdict(ratio, TARGETS['served_over_faiss_10m'], at_most=False)} (a 10M target)"
    )
    print(f"GET /search/{{id}} p99 / p50: {p99 / p50:.2f} {verdict(p99 / p50, TARGETS['p99_over_p50'])}")
    wrong = serve_faiss.mismatches(flat, codes, served["answers"], args.k)
    print(
        f"exactness: {len(served['answers']) - len(wrong)} of {len(served['answers'])} served answers equal brute force"
    )
    for line in wrong[:5]:
        print(f"  {line}")
    del flat
    ours_vs_faiss(args, codes, queries)
    radius_comparison(args, codes)
    return ratio, len(wrong)


def ours_vs_faiss(args: argparse.Namespace, codes: np.ndarray, queries: np.ndarray) -> None:
    """The shards' own search in-process (ShardIndex + merge) against one faiss index, same threads and batches."""
    faiss.omp_set_num_threads(args.index_threads)
    ours = serve_faiss.shard_search(codes, args.shards, args.k, args.index_threads)
    flat = serve_faiss.flat_index(codes)
    ours_ms, faiss_ms = serve_faiss.ours_vs_faiss(ours, lambda q: flat.search(q, args.k), queries, args.clients)
    print(
        f"in-process, batches of {args.clients}, {args.index_threads} thread(s) each, median of {serve_faiss.INDEX_ROUNDS} rounds:"
    )
    print(f"  sharded x{args.shards} (ours) {ours_ms:8.2f} ms/batch   faiss IndexBinaryFlat {faiss_ms:8.2f} ms/batch")
    print(
        f"  ratio (faiss / ours) {faiss_ms / ours_ms:.2f} {verdict(faiss_ms / ours_ms, TARGETS['ours_over_faiss'], at_most=False)}"
    )


def radius_comparison(args: argparse.Namespace, codes: np.ndarray) -> None:
    """faiss IndexBinaryMultiHash and our scan vs faiss's flat range_search, one thread each (as a shard), per size."""
    faiss.omp_set_num_threads(1)
    for size in (s for s in ints(args.multihash_sizes) if s <= len(codes)):
        part = codes[:size]
        queries = serve_faiss.radius_queries(part, args.multihash_queries, args.seed + 3)
        for nhash in ints(args.nhash):
            build_s, rows = serve_faiss.multihash_vs_flat(
                part, queries, ints(args.multihash_radii), nhash=nhash, k=MAX_K
            )
            print(
                f"radius search, {size:,} codes, {len(queries)} queries, 1 thread: IndexBinaryMultiHash "
                f"nhash={nhash} b={args.bits // nhash} (built in {build_s:.1f} s) and a shard's scan "
                f"(first {MAX_K} within r) vs IndexBinaryFlat.range_search"
            )
            for radius, flat_qps, multi_qps, ours_qps, equal in rows:
                print(
                    f"  r={radius}  faiss scan {flat_qps:9.1f} q/s   multi-hash {multi_qps:9.1f} q/s "
                    f"x{multi_qps / flat_qps:7.1f}   ours {ours_qps:9.1f} q/s x{ours_qps / flat_qps:7.1f}   "
                    f"results {'equal' if equal else 'DIFFER'}"
                )


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="hashray-bench-", dir=args.workdir) as tmp:
        root = Path(tmp)
        seconds = serve_inputs.write_codes_dir(
            root / "codes", count=args.codes, bits=args.bits, seed=args.seed, row_group=args.row_group
        )
        size = sum(f.stat().st_size for f in (root / "codes").iterdir())
        print(
            f"codes dir: {args.codes:,} codes written in {seconds:.1f} s ({size / 2**20:,.0f} MiB on disk, "
            f"{len(list((root / 'codes').glob('*.parquet')))} files); bench process {own_memory()}"
        )
        run, data, images = serve_inputs.write_run_and_data(
            root, bits=args.bits, image_size=args.image_size, seed=args.seed
        )
        use_fast_http()  # as `hashray serve` does before it starts Ray
        ray.init(include_dashboard=False, log_to_driver=False)
        if args.shards is None:
            args.shards = shard_count(args.codes, ray.cluster_resources()["CPU"])
        try:
            served = http_benchmark(args, run, str(root / "codes"), data, images)
        finally:
            serve.shutdown()
            ray.shutdown()
        ratio, wrong = compare(args, str(root / "codes"), served)
    print_targets(served, ratio, wrong)


def print_targets(served: dict, ratio: float, wrong: int) -> None:
    """The targets beside the figures they apply to, in one block."""
    qps, p50, p99, errors = served["loads"]["GET /search/{id}"]
    total_errors = sum(result[3] for result in served["loads"].values())
    print("targets:")
    print(f"  errors on every endpoint: {total_errors} {verdict(total_errors, TARGETS['errors'])}")
    print(f"  GET /search/{{id}} p50 {p50:.1f} ms {verdict(p50, TARGETS['p50_ms_1m'])} (1M target)")
    print(f"  GET /search/{{id}} p99 {p99:.1f} ms {verdict(p99, TARGETS['p99_ms_1m'])} (1M target)")
    print(f"  GET /search/{{id}} p99 / p50 {p99 / p50:.2f} {verdict(p99 / p50, TARGETS['p99_over_p50'])}")
    print(
        f"  served / faiss alone QPS {ratio:.2f} {verdict(ratio, TARGETS['served_over_faiss_10m'], at_most=False)} (10M target)"
    )
    print(f"  served answers unlike brute force: {wrong} {verdict(wrong, 0)}")
    print(
        f"  largest shard RSS / its share {served['worst_rss']:.2f} {verdict(served['worst_rss'], TARGETS['rss_over_share'])}"
    )


if __name__ == "__main__":
    main()
