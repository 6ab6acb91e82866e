"""A small command-line client for searchrec, for people at a shell.

    python -m server.client search "cordless drill" --explain
    python -m server.client search "drill" --k 5 --max-price 100 --category "Power Tools" --in-stock
    python -m server.client similar SR-00001
    python -m server.client recommend U0001 --k 5            (--recent SR-00001 for a session)
    python -m server.client feedback U0001 SR-00100 --type purchase
    python -m server.client upsert NEW-1 "Some title" --category "Power Tools" --price 99
    python -m server.client delete NEW-1
    python -m server.client info | health | reload [PATH]
    python -m server.client campaigns put '{"campaignId": "c1", "advertiser": "acme", "itemIds": ["SR-00007"],
                                           "maxCpc": 0.8, "dailyBudget": 20, "keywords": [{"text": "drill"}]}'
    python -m server.client campaigns list | pause c1 | resume c1
    python -m server.client ads-report [--campaign c1] [--from-day 2026-12-01]
    python -m server.client feedback U0001 SR-00007 --type click --auction AUCTION_ID   (an ad's click)

Against a server with access control: `--token T` (or SEARCHREC_TOKEN) sends `authorization: Bearer T`;
`--tls-ca CA.pem` connects over TLS, and `--tls-cert/--tls-key` add a client certificate (mutual TLS).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.stubs import pb, pb_grpc


def _filters(args) -> "pb.Filters":
    f = pb.Filters(categories=args.category or [], brands=args.brand or [], in_stock_only=args.in_stock)
    if args.min_price is not None:
        f.min_price = args.min_price
    if args.max_price is not None:
        f.max_price = args.max_price
    return f


def _print_sponsored(sponsored) -> None:
    for s in sponsored:
        it = s.item
        print(f"  ad {s.slot}. {it.item_id:<12} {it.title}  [{s.advertiser} / {s.campaign_id}: ${s.cpc:.2f} a click, "
              f"pCTR {s.pctr:.3f}]\n        auction {s.auction_id}")


def _print_items(items, explain: bool) -> None:
    for rank, it in enumerate(items, start=1):
        price = f"${it.price:,.2f}" if it.HasField("price") else "-"
        print(f"{rank:>3}. {it.score:7.4f}  {it.item_id:<12} {it.title}  [{it.category} | {it.brand} | {price}"
              f"{'' if it.in_stock else ' | out of stock'}]")
        if explain:
            print("       " + "  ".join(f"{c.name}={c.value:.3f}->{c.contribution:+.3f}" for c in it.explanation))


class _Bearer(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (works on plaintext and TLS channels)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation, details, request):
        metadata = list(details.metadata or []) + [("authorization", f"Bearer {self.token}")]
        return continuation(details._replace(metadata=metadata), request)


def open_channel(target: str, token: str | None = None, ca: str | None = None, cert: str | None = None,
                 key: str | None = None) -> grpc.Channel:
    """A channel to target: TLS when ca is given (a client certificate with cert+key), a token when given."""
    if ca:
        key_pem, cert_pem = (Path(p).read_bytes() if p else None for p in (key, cert))
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(), private_key=key_pem,
                                             certificate_chain=cert_pem)
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    return grpc.intercept_channel(channel, _Bearer(token)) if token else channel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.client")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--token", default=os.environ.get("SEARCHREC_TOKEN"), help="bearer token (or SEARCHREC_TOKEN)")
    p.add_argument("--tls-ca", help="PEM CA that signed the server's certificate: connect over TLS")
    p.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="PEM client key (mutual TLS)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("search", "similar"):
        s = sub.add_parser(name)
        s.add_argument("query" if name == "search" else "item_id")
        s.add_argument("--k", type=int, default=None)
        s.add_argument("--explain", action="store_true")
        s.add_argument("--min-price", type=float)
        s.add_argument("--max-price", type=float)
        s.add_argument("--category", action="append")
        s.add_argument("--brand", action="append")
        s.add_argument("--in-stock", action="store_true")
        if name == "search":
            s.add_argument("--classify-query", action="store_true", help="also print the query's predicted category")
            s.add_argument("--prefix", action="store_true", help="search as you type: the last word may be unfinished")
            s.add_argument("--sort", choices=("relevance", "price_asc", "price_desc", "popularity", "newest"),
                           default="relevance")
            s.add_argument("--facet", action="append", default=[], choices=("category", "brand", "price"))
            s.add_argument("--below-price", type=float, help="exclusive upper price bound (a price facet bucket)")
            s.add_argument("--page-token", default="", help="the next_page_token of the previous page")
            s.add_argument("--paged", action="store_true", help="print a token for the next page")
            s.add_argument("--offset", type=int, help="start at this position of the list")
        s.add_argument("--ad-slots", type=int, help="sponsored slots (0 = none; default: the server's)")
    sg = sub.add_parser("suggest", help="query suggestions for a prefix as typed")
    sg.add_argument("prefix")
    sg.add_argument("--k", type=int, default=None)
    sg.add_argument("--user", default="", help="personalise for this user's recent behaviour")
    cf = sub.add_parser("classify", help="category paths of item titles (or --query texts)")
    cf.add_argument("titles", nargs="*")
    cf.add_argument("--query", action="append", default=[], help="classify this free text (repeatable)")
    cf.add_argument("--brand", default="")
    cf.add_argument("--k", type=int, default=None)
    rl = sub.add_parser("rules", help="merchandising rules: list, put (JSON: one Rule or a list), delete")
    rl.add_argument("action", choices=("list", "put", "delete"))
    rl.add_argument("values", nargs="*", help="put: JSON rules, e.g. '{\"ruleId\": \"p1\", \"query\": \"drill\", "
                    "\"pin\": {\"itemId\": \"SR-00001\", \"position\": 1}}'; delete: rule ids")
    rc = sub.add_parser("recommend")
    rc.add_argument("user_id")
    rc.add_argument("--recent", action="append", default=[])
    rc.add_argument("--k", type=int, default=None)
    for flag in ("--min-price", "--max-price"):
        rc.add_argument(flag, type=float)
    rc.add_argument("--category", action="append")
    rc.add_argument("--brand", action="append")
    rc.add_argument("--in-stock", action="store_true")
    rc.add_argument("--ad-slots", type=int, help="sponsored slots (0 = none; default: the server's)")
    cp = sub.add_parser("campaigns", help="sponsored-product campaigns: list, put (JSON: one Campaign or a list), "
                                          "pause, resume")
    cp.add_argument("action", choices=("list", "put", "pause", "resume"))
    cp.add_argument("values", nargs="*", help="put: JSON campaigns; pause/resume: campaign ids")
    cp.add_argument("--advertiser", default="")
    ar = sub.add_parser("ads-report", help="impressions, clicks, CTR, spend and CPC per campaign and day")
    ar.add_argument("--campaign", action="append", default=[])
    ar.add_argument("--advertiser", default="")
    ar.add_argument("--from-day", default="")
    ar.add_argument("--to-day", default="")
    fb = sub.add_parser("feedback")
    fb.add_argument("user_id")
    fb.add_argument("item_id")
    fb.add_argument("--type", choices=("view", "click", "add_to_cart", "purchase"), default="purchase")
    fb.add_argument("--event-id", default=None, help="default: a fresh uuid")
    fb.add_argument("--auction", default="", help="the auction_id of the ad this event is about")
    up = sub.add_parser("upsert")
    up.add_argument("item_id")
    up.add_argument("title")
    up.add_argument("--category", default="")
    up.add_argument("--brand", default="")
    up.add_argument("--price", type=float)
    up.add_argument("--out-of-stock", action="store_true")
    de = sub.add_parser("delete")
    de.add_argument("item_ids", nargs="+")
    sub.add_parser("info")
    sub.add_parser("health")
    r = sub.add_parser("reload")
    r.add_argument("path", nargs="?", default="")
    args = p.parse_args(argv)

    with open_channel(args.target, args.token, args.tls_ca, args.tls_cert, args.tls_key) as channel:
        stub = pb_grpc.SearchRecommendStub(channel)
        try:
            if args.cmd == "search":
                req = pb.SearchRequest(query=args.query, filters=_filters(args), explain=args.explain,
                                       classify_query=args.classify_query, prefix=args.prefix,
                                       sort=pb.SortBy.Value(args.sort.upper()), facets=args.facet,
                                       page_token=args.page_token, paged=args.paged)
                if args.below_price is not None:
                    req.filters.below_price = args.below_price
                if args.k is not None:
                    req.k = args.k
                if args.offset is not None:
                    req.offset = args.offset
                if args.ad_slots is not None:
                    req.ad_slots = args.ad_slots
                resp = stub.Search(req, timeout=args.timeout)
                t = resp.timings
                print(f"bundle {resp.bundle_version}: {len(resp.items)} items in {t.total_ms:.1f} ms "
                      f"(queue {t.queue_ms:.1f}, encode {t.encode_ms:.1f}, retrieve {t.retrieve_ms:.1f}, "
                      f"rank {t.rank_ms:.1f}; batch of {t.batch_size})")
                if resp.corrected_query:
                    print(f"searched for: {resp.corrected_query}")
                if resp.HasField("predicted_category"):
                    c = resp.predicted_category
                    print(f"query category: {c.path} ({c.probability:.2f})")
                if resp.total_results:
                    print(f"items {resp.offset + 1}-{resp.offset + len(resp.items)} of {resp.total_results} "
                          f"(the relevant set, sorted by {args.sort})")
                for f in resp.facets:
                    print(f"facet {f.field}: " + ", ".join(f"{'  ' * v.level}{v.value} ({v.count})" for v in f.values)
                          + (f" (+{f.more_values} more)" if f.more_values else ""))
                for f in resp.rules_fired:
                    print(f"rule {f.rule_id} ({f.kind}): {f.detail}")
                _print_sponsored(resp.sponsored)
                _print_items(resp.items, args.explain)
                if resp.next_page_token:
                    print(f"next page: --page-token {resp.next_page_token}")
            elif args.cmd == "suggest":
                req = pb.SuggestRequest(prefix=args.prefix, user_id=args.user)
                if args.k is not None:
                    req.k = args.k
                resp = stub.Suggest(req, timeout=args.timeout)
                for sug in resp.suggestions:
                    marks = "".join(m for m, on in ((" (typo fixed)", sug.corrected), (" (for you)", sug.personalised))
                                    if on)
                    print(f"{sug.text:40s} {sug.results:6d} results  {sug.top_category:30s} {sug.source}{marks}")
            elif args.cmd == "rules":
                if args.action == "list":
                    for rule in stub.ListRules(pb.ListRulesRequest(), timeout=args.timeout).rules:
                        print(json_format.MessageToJson(rule, indent=None))
                elif args.action == "put":
                    rules = []
                    for text in args.values:
                        parsed = json.loads(text)
                        for one in parsed if isinstance(parsed, list) else [parsed]:
                            rules.append(json_format.ParseDict(one, pb.Rule()))
                    print(stub.PutRules(pb.PutRulesRequest(rules=rules), timeout=args.timeout))
                else:
                    print(stub.DeleteRules(pb.DeleteRulesRequest(rule_ids=args.values), timeout=args.timeout))
            elif args.cmd == "classify":
                req = pb.ClassifyRequest(items=[pb.ClassifyItem(title=t, brand=args.brand) for t in args.titles],
                                         queries=args.query)
                if args.k is not None:
                    req.k = args.k
                resp = stub.Classify(req, timeout=args.timeout)
                never = resp.autofill_threshold >= 1.0
                print(f"bundle {resp.bundle_version}: auto-fill threshold {resp.autofill_threshold:.2f}"
                      + (" (its dev split could not show 95% precision: it never fills in a category)" if never else ""))
                for text, res in zip(list(args.titles) + args.query, list(resp.items) + list(resp.queries)):
                    print(f"{text}{'' if res.confident or never else '   (below the auto-fill threshold)'}")
                    for c in res.categories:
                        levels = " | ".join(f"{lv.name.split(' > ')[-1]} {lv.probability:.2f}" for lv in c.levels)
                        print(f"  {c.probability:6.3f}  {c.path}   [{levels}]")
            elif args.cmd == "similar":
                req = pb.SimilarItemsRequest(item_id=args.item_id, filters=_filters(args), explain=args.explain)
                if args.k is not None:
                    req.k = args.k
                if args.ad_slots is not None:
                    req.ad_slots = args.ad_slots
                resp = stub.SimilarItems(req, timeout=args.timeout)
                print(f"bundle {resp.bundle_version}: {len(resp.items)} items")
                _print_sponsored(resp.sponsored)
                _print_items(resp.items, args.explain)
            elif args.cmd == "recommend":
                req = pb.RecommendRequest(user_id=args.user_id, recent_item_ids=args.recent, filters=_filters(args))
                if args.k is not None:
                    req.k = args.k
                if args.ad_slots is not None:
                    req.ad_slots = args.ad_slots
                resp = stub.Recommend(req, timeout=args.timeout)
                print(f"bundle {resp.bundle_version}: {len(resp.items)} items for {args.user_id!r}")
                _print_sponsored(resp.sponsored)
                _print_items(resp.items, False)
            elif args.cmd == "campaigns":
                if args.action == "list":
                    for c in stub.ListCampaigns(pb.ListCampaignsRequest(advertiser=args.advertiser),
                                                timeout=args.timeout).campaigns:
                        print(json_format.MessageToJson(c, indent=None))
                elif args.action == "put":
                    campaigns = []
                    for text in args.values:
                        parsed = json.loads(text)
                        for one in parsed if isinstance(parsed, list) else [parsed]:
                            campaigns.append(json_format.ParseDict(one, pb.Campaign()))
                    print(stub.PutCampaigns(pb.PutCampaignsRequest(campaigns=campaigns), timeout=args.timeout))
                else:
                    status = pb.PAUSED if args.action == "pause" else pb.ACTIVE
                    for cid in args.values:
                        r = stub.SetCampaignStatus(pb.SetCampaignStatusRequest(campaign_id=cid, status=status),
                                                   timeout=args.timeout)
                        print(f"{cid}: {r.campaign.state.serving} (token {r.sequence_token})")
            elif args.cmd == "ads-report":
                resp = stub.AdsReport(pb.AdsReportRequest(campaign_ids=args.campaign, advertiser=args.advertiser,
                                                          from_day=args.from_day, to_day=args.to_day),
                                      timeout=args.timeout)
                print(f"{'campaign':<14}{'advertiser':<14}{'day':<12}{'served':>8}{'impr.':>8}{'clicks':>8}{'CTR':>8}"
                      f"{'spend':>10}{'CPC':>8}{'unbilled':>10}")
                for r in resp.rows:
                    print(f"{r.campaign_id:<14}{r.advertiser:<14}{r.day:<12}{r.served:>8}{r.impressions:>8}{r.clicks:>8}"
                          f"{r.ctr:>8.3f}{r.spend:>10.2f}{r.avg_cpc:>8.2f}{r.unbilled_clicks:>10}")
            elif args.cmd == "feedback":
                ev = pb.Event(event_id=args.event_id or uuid.uuid4().hex, user_id=args.user_id, item_id=args.item_id,
                              type=pb.Event.Type.Value(args.type.upper()), timestamp_ms=int(time.time() * 1000),
                              auction_id=args.auction)
                print(stub.Feedback(pb.FeedbackRequest(events=[ev]), timeout=args.timeout))
            elif args.cmd == "upsert":
                item = pb.Item(item_id=args.item_id, title=args.title, category=args.category, brand=args.brand,
                               in_stock=not args.out_of_stock)
                if args.price is not None:
                    item.price = args.price
                print(stub.UpsertItems(pb.UpsertItemsRequest(items=[item]), timeout=args.timeout))
            elif args.cmd == "delete":
                print(stub.DeleteItems(pb.DeleteItemsRequest(item_ids=args.item_ids), timeout=args.timeout))
            elif args.cmd == "info":
                print(stub.GetInfo(pb.GetInfoRequest(), timeout=args.timeout))
            elif args.cmd == "health":
                h = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
                print(health_pb2.HealthCheckResponse.ServingStatus.Name(h.status))
            elif args.cmd == "reload":
                print(stub.ReloadBundle(pb.ReloadBundleRequest(path=args.path), timeout=120))
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
