"""Locust gRPC load test of searchrec: a production-like mix with a deadline on every call.

    locust -f loadtest/locustfile.py --headless -u 32 -r 8 -t 60s --host 127.0.0.1:50051 \
        --csv out/load --html out/load.html

Mix (task weights): Search 70 (real queries: the Home Depot dev queries when the data directory is
there, else the sample's; filters on 20% of them), Recommend 15, SimilarItems 10, Feedback 5. A Search is
preceded by what a storefront sends while the shopper types it: a Suggest for each of up to four prefixes
(several Suggest calls per Search, as in production autocomplete) and, one time in three, a search-as-you-type
Search on the half-typed query; three Searches in ten are storefront lists (facets, a sort, a page token), and
a third of those fetch the next page.
Item and user ids come from the bundle being served (SEARCHREC_BUNDLE, default bundles/sample).
Every call has a deadline (SEARCHREC_DEADLINE_MS, default 1000); SEARCHREC_TOKEN and SEARCHREC_TLS_CA
reach a server that runs with --tokens / TLS. An interceptor reports each call
to Locust's request event, so Locust's statistics are gRPC calls by method. At the end the load
generator prints its own CPU use: it shares the machine with the server.
"""
from __future__ import annotations

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel exists: gRPC must cooperate with gevent

import csv  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
from locust import User, between, events, task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from server.client import open_channel  # noqa: E402
from server.stubs import pb, pb_grpc  # noqa: E402

DEADLINE_S = float(os.environ.get("SEARCHREC_DEADLINE_MS", "1000")) / 1000.0
BUNDLE = Path(os.environ.get("SEARCHREC_BUNDLE", ROOT / "bundles" / "sample"))
DATA_DIR = Path(os.environ.get("SEARCHREC_DATA_DIR", ROOT.parent / "shared" / "data"))


def _queries() -> list[str]:
    path = os.environ.get("SEARCHREC_QUERIES")
    if path:  # one query per line
        return [q.strip() for q in Path(path).read_text().splitlines() if q.strip()]
    hd = DATA_DIR / "homedepot" / "judgments.csv"
    if hd.is_file():
        from training.data import query_split

        qs = sorted({r["query"] for r in csv.DictReader(open(hd, encoding="utf-8"))})
        return [q for q in qs if query_split(q) == "rerank"]  # the held-out dev split
    return sorted({r["query"] for r in csv.DictReader(open(ROOT / "training" / "sample" / "judgments.csv"))})


QUERIES = _queries()
ITEMS = pd.read_parquet(BUNDLE / "items.parquet")["item_id"].astype(str).tolist()
CATEGORIES = sorted({c for c in pd.read_parquet(BUNDLE / "items.parquet")["category"].astype(str) if c})
USERS = (pd.read_parquet(BUNDLE / "rec_users.parquet")["user_id"].astype(str).tolist()
         if (BUNDLE / "rec_users.parquet").is_file() else [])


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Reports every unary call (time, size, exception) to Locust's request event."""

    def __init__(self, environment) -> None:
        self.env = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        started = time.perf_counter()
        response, exception, length = None, None, 0
        try:
            call = continuation(client_call_details, request)
            response = call.result()
            length = response.ByteSize()
        except grpc.RpcError as exc:
            exception = exc
            call = None
        self.env.events.request.fire(
            request_type="grpc", name=client_call_details.method.rsplit("/", 1)[-1],
            response_time=(time.perf_counter() - started) * 1000, response_length=length,
            exception=exception, context={})
        if exception is not None:
            raise exception
        return call


SUGGESTS_PER_SEARCH = 4


class SearchrecUser(User):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        host = (self.host or "127.0.0.1:50051").replace("grpc://", "")
        # SEARCHREC_TOKEN / SEARCHREC_TLS_CA: test a server that runs with --tokens / TLS.
        channel = open_channel(host, os.environ.get("SEARCHREC_TOKEN"), os.environ.get("SEARCHREC_TLS_CA"))
        self.channel = grpc.intercept_channel(channel, LocustInterceptor(self.environment))
        self.stub = pb_grpc.SearchRecommendStub(self.channel)
        self.user_id = random.choice(USERS) if USERS and random.random() < 0.7 else f"load-{uuid.uuid4().hex[:8]}"

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, method, request) -> None:
        try:
            method(request, timeout=DEADLINE_S)
        except grpc.RpcError:
            pass  # already reported as a failure by the interceptor

    @task(70)
    def search(self) -> None:
        query = random.choice(QUERIES)
        for n in sorted(random.sample(range(1, len(query) + 1), min(SUGGESTS_PER_SEARCH, len(query)))):
            self._call(self.stub.Suggest, pb.SuggestRequest(prefix=query[:n], k=8, user_id=self.user_id))
        if random.random() < 1 / 3:
            self._call(self.stub.Search, pb.SearchRequest(query=query[: max(1, len(query) // 2)], k=10, prefix=True))
        req = pb.SearchRequest(query=query, k=10)
        if random.random() < 0.3:
            req.facets.extend(("category", "brand", "price"))
            req.sort = random.choice((pb.RELEVANCE, pb.PRICE_ASC, pb.PRICE_DESC, pb.POPULARITY))
            req.paged = True
            try:
                resp = self.stub.Search(req, timeout=DEADLINE_S)
            except grpc.RpcError:
                return  # already reported as a failure by the interceptor
            if resp.next_page_token and random.random() < 1 / 3:
                req.page_token = resp.next_page_token
                self._call(self.stub.Search, req)
            return
        if random.random() < 0.2:
            if CATEGORIES and random.random() < 0.5:
                req.filters.categories.append(random.choice(CATEGORIES))
            else:
                req.filters.max_price = random.choice((25.0, 50.0, 100.0, 500.0))
        self._call(self.stub.Search, req)

    @task(15)
    def recommend(self) -> None:
        if USERS:  # bundles without a recommender answer FAILED_PRECONDITION: skip them
            self._call(self.stub.Recommend, pb.RecommendRequest(user_id=self.user_id, k=10))

    @task(10)
    def similar(self) -> None:
        self._call(self.stub.SimilarItems, pb.SimilarItemsRequest(item_id=random.choice(ITEMS), k=10))

    @task(5)
    def feedback(self) -> None:
        ev = pb.Event(event_id=uuid.uuid4().hex, user_id=self.user_id, item_id=random.choice(ITEMS),
                      type=random.choice((pb.Event.VIEW, pb.Event.CLICK, pb.Event.ADD_TO_CART, pb.Event.PURCHASE)),
                      timestamp_ms=int(time.time() * 1000))
        self._call(self.stub.Feedback, pb.FeedbackRequest(events=[ev]))


_proc = psutil.Process()
_start = {}


@events.test_start.add_listener
def _mark_start(environment, **_kw) -> None:
    t = _proc.cpu_times()
    _start.update(cpu=t.user + t.system, wall=time.monotonic())


@events.quitting.add_listener
def _report_cpu(environment, **_kw) -> None:
    if not _start:
        return
    t = _proc.cpu_times()
    cpu, wall = t.user + t.system - _start["cpu"], time.monotonic() - _start["wall"]
    print(f"load generator CPU: {cpu:.1f} s over {wall:.1f} s = {100 * cpu / max(wall, 1e-9):.0f}% of one core "
          f"(of {psutil.cpu_count()} cores shared with the server)", flush=True)
