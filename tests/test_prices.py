"""Prices are exact on a real server: a price comes back as the double it was given (322.99, not the float32
322.989990234375), from the bundle and from live upserts, after other catalog changes and after a restart;
price filters compare the exact values (a bound equal to a price admits it)."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from tests.conftest import SAMPLE, ServerThread, make_config


def catalog_prices() -> dict[str, float]:
    rows = [json.loads(line) for line in (SAMPLE / "catalog.jsonl").read_text().splitlines()]
    return {r["item_id"]: r["price"] for r in rows if r.get("price") is not None}


def by_id(stub, pb, item_id: str, **filters):
    resp = stub.Search(pb.SearchRequest(query="item", k=1, filters=pb.Filters(item_ids=[item_id], **filters)),
                       timeout=30)
    return resp.items[0] if resp.items else None


@pytest.fixture(scope="module")
def price_config(sample_bundle, tmp_path_factory):
    return make_config(sample_bundle, state_dir=tmp_path_factory.mktemp("prices"), fsync=False)


def test_prices_come_back_exactly_as_given(price_config, pb):
    from server.stubs import pb_grpc

    prices = catalog_prices()
    inexact = {i: p for i, p in prices.items() if float(np.float32(p)) != p}
    assert len(inexact) > 100  # most of the sample's prices (x.99) are not float32 numbers
    srv = ServerThread(price_config).start()
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            some = sorted(inexact)[:20]
            for item_id in some:
                assert by_id(stub, pb, item_id).price == prices[item_id]
            # A search answer (not only a filtered lookup) carries the exact prices too.
            for it in stub.Search(pb.SearchRequest(query="cordless drill", k=20), timeout=30).items:
                assert it.price == prices[it.item_id]
            stub.UpsertItems(pb.UpsertItemsRequest(items=[
                pb.Item(item_id="P-1", title="Exact Price Drill", price=322.99, in_stock=True),
                pb.Item(item_id="P-2", title="Exact Price Saw", price=0.1, in_stock=True)]), timeout=60)
            assert by_id(stub, pb, "P-1").price == 322.99 and by_id(stub, pb, "P-2").price == 0.1
            for item_id in some:  # the bundle's items, rebuilt with the live change, keep their prices
                assert by_id(stub, pb, item_id).price == prices[item_id]
            # Bounds equal to the price admit it; a hair below the price does not.
            assert by_id(stub, pb, "P-1", min_price=322.99, max_price=322.99) is not None
            assert by_id(stub, pb, "P-1", max_price=322.98999999) is None
            first = some[0]
            assert by_id(stub, pb, first, min_price=prices[first], max_price=prices[first]) is not None
    finally:
        srv.stop()
    srv = ServerThread(price_config).start()  # replayed from the log
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SearchRecommendStub(ch)
            assert by_id(stub, pb, "P-1").price == 322.99
            assert by_id(stub, pb, some[0]).price == prices[some[0]]
    finally:
        srv.stop()
