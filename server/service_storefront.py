"""The storefront part of the gRPC service: Suggest and the merchandising-rule RPCs (protobuf <-> server.suggest,
server.rules).

`StorefrontRpcs` is mixed into `server.service.SearchRecommendService`, which wraps its handlers with the service's
error mapping (the service module keeps Search, Recommend, SimilarItems, the writes and administration).
"""
from __future__ import annotations

import math

from common.suggest import phrase_key
from common.text import has_control_chars
from server.config import MAX_QUERY_CHARS
from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.fields import MAX_FILTER_VALUE_CHARS, MAX_ID_CHARS, text_field
from server.rules import BOOST_FIELDS, MAX_RULES
from server.stubs import pb

MAX_PREFIX_CHARS = 100
MAX_RULE_ID_CHARS = 128
MAX_SYNONYM_TERMS = 20
MAX_PIN_POSITION = 100
MAX_BOOST = 100.0
MAX_SUGGEST_K = 20
DEFAULT_SUGGEST_K = 8
PERSONAL_EVENTS = 20  # a user's most recent events that personalise suggestions


class StorefrontRpcs:
    """Suggest and the merchandising-rule RPCs (mixed into SearchRecommendService)."""

    holder: object
    replica: object

    # --- Suggest -----------------------------------------------------------------------------
    async def Suggest(self, request, context):
        prefix = request.prefix
        if not prefix.strip():
            raise InvalidArgument("prefix must not be empty or whitespace", field="prefix")
        if len(prefix) > MAX_PREFIX_CHARS:
            raise InvalidArgument(f"prefix is {len(prefix)} characters; the limit is {MAX_PREFIX_CHARS}", field="prefix")
        if has_control_chars(prefix):
            raise InvalidArgument("prefix must not contain control characters", field="prefix")
        k = DEFAULT_SUGGEST_K
        if request.HasField("k"):
            k = request.k
            if not 1 <= k <= MAX_SUGGEST_K:
                raise InvalidArgument(f"k must be between 1 and {MAX_SUGGEST_K}, got {k}", field="k")
        user_id = text_field(request.user_id, "user_id", MAX_ID_CHARS, required=False)
        runtime = self.holder.current
        if runtime.suggester is None:
            raise FailedPrecondition(f"bundle {runtime.version} has no suggestion table (built before suggestions); "
                                     "give it one with `python -m training suggest --bundle B --query-log CSV --out NEW`",
                                     field="bundle")
        categories: frozenset[str] = frozenset()
        store = self.holder.store
        if user_id and store is not None:
            items = runtime.bundle.items
            rows = [items.id_to_row.get(i) for i, _ in (await store.user_events(self.pseudonymise(user_id)))[-PERSONAL_EVENTS:]]
            categories = frozenset(items.categories[r].lower() for r in rows if r is not None and items.categories[r])
        out = runtime.suggester.suggest(prefix, k, categories, request.include_zero_results, request.include_blocked)
        return pb.SuggestResponse(bundle_version=runtime.version, suggestions=[
            pb.Suggestion(text=s.text, results=s.results, top_category=s.top_category, score=s.score, source=s.source,
                          corrected=s.corrected, personalised=s.personalised) for s in out])

    # --- merchandising rules -------------------------------------------------------------------
    def _rule(self, r, f: str, catalog) -> dict:
        """pb.Rule -> the record the log and the store keep (validated)."""
        rule_id = text_field(r.rule_id, f"{f}.rule_id", MAX_RULE_ID_CHARS, required=True)
        kind = r.WhichOneof("action")
        if kind is None:
            raise InvalidArgument(f"{f} needs one of synonyms, pin, boost or hide", field=f)
        query = text_field(r.query, f"{f}.query", MAX_QUERY_CHARS, required=False)
        key = phrase_key(query)
        if query and not key:
            raise InvalidArgument(f"{f}.query has no words", field=f"{f}.query")
        if r.match not in (0, 1):
            raise InvalidArgument(f"{f}.match must be EXACT or CONTAINS, got {r.match}", field=f"{f}.match")
        rec: dict = {"rule_id": rule_id, "kind": kind, "query": key, "match": "contains" if r.match == 1 else "exact"}

        def known(item_id: str, field: str) -> str:
            item_id = text_field(item_id, field, MAX_ID_CHARS, required=True)
            if item_id not in catalog.id_to_row:
                raise NotFound(f"{field} {item_id!r} is not in the catalog; no rule of this request was stored",
                               field=field)
            return item_id

        if kind == "synonyms":
            if key:
                raise InvalidArgument(f"{f}.query must be empty for synonyms: they fire on their own terms",
                                      field=f"{f}.query")
            s = r.synonyms
            if not 2 <= len(s.terms) <= MAX_SYNONYM_TERMS:
                raise InvalidArgument(f"{f}.synonyms.terms has {len(s.terms)} terms; give 2..{MAX_SYNONYM_TERMS}",
                                      field=f"{f}.synonyms.terms")
            terms = []
            for j, t in enumerate(s.terms):
                tf = f"{f}.synonyms.terms[{j}]"
                term = phrase_key(text_field(t, tf, MAX_FILTER_VALUE_CHARS, required=True))
                if not term:
                    raise InvalidArgument(f"{tf} has no words", field=tf)
                if term in terms:
                    raise InvalidArgument(f"{tf} {term!r} repeats an earlier term", field=tf)
                terms.append(term)
            rec.update(terms=terms, one_way=bool(s.one_way))
        elif kind == "pin":
            if not key:
                raise InvalidArgument(f"{f}.query is required for a pin (the query it places the item in)",
                                      field=f"{f}.query")
            if not 1 <= r.pin.position <= MAX_PIN_POSITION:
                raise InvalidArgument(f"{f}.pin.position must be between 1 and {MAX_PIN_POSITION}, got {r.pin.position}",
                                      field=f"{f}.pin.position")
            rec.update(item_id=known(r.pin.item_id, f"{f}.pin.item_id"), position=int(r.pin.position))
        elif kind == "boost":
            b = r.boost
            fld = text_field(b.field, f"{f}.boost.field", MAX_FILTER_VALUE_CHARS, required=True)
            if fld not in BOOST_FIELDS and not (fld.startswith("attributes.") and len(fld) > len("attributes.")):
                raise InvalidArgument(f"{f}.boost.field must be brand, category, in_stock or attributes.KEY, got {fld!r}",
                                      field=f"{f}.boost.field")
            value = text_field(b.value, f"{f}.boost.value", MAX_FILTER_VALUE_CHARS, required=True)
            if fld == "in_stock" and value.lower() not in ("true", "false"):
                raise InvalidArgument(f"{f}.boost.value must be true or false for in_stock, got {value!r}",
                                      field=f"{f}.boost.value")
            if not (math.isfinite(b.weight) and 0 < abs(b.weight) <= MAX_BOOST):
                raise InvalidArgument(f"{f}.boost.weight must be a non-zero number between -{MAX_BOOST:g} and "
                                      f"{MAX_BOOST:g} (negative buries), got {b.weight}", field=f"{f}.boost.weight")
            rec.update(field=fld, value=value, weight=float(b.weight))
        else:
            rec.update(item_id=known(r.hide.item_id, f"{f}.hide.item_id"))
        return rec

    async def PutRules(self, request, context):
        self._live()
        self._batch_size(len(request.rules), "rules")
        catalog = self.holder.current.bundle.items
        records, seen = [], set()
        for i, r in enumerate(request.rules):
            rec = self._rule(r, f"rules[{i}]", catalog)
            if rec["rule_id"] in seen:
                raise InvalidArgument(f"rules[{i}].rule_id {rec['rule_id']!r} appears twice in this request",
                                      field=f"rules[{i}].rule_id")
            seen.add(rec["rule_id"])
            records.append(rec)
        live = self.holder.live
        if len(set(live.rules) | seen) > MAX_RULES:
            raise InvalidArgument(f"rules would number {len(set(live.rules) | seen)}; the limit is {MAX_RULES}",
                                  field="rules")
        async with self.holder.catalog_lock:  # in the catalog's order: a sequence token covers rules too
            token = await self.replica.write_catalog("rules", records, None)
        return pb.PutRulesResponse(put=len(records), sequence_token=token)

    async def DeleteRules(self, request, context):
        live = self._live()
        self._batch_size(len(request.rule_ids), "rule_ids")
        ids = [text_field(r, f"rule_ids[{i}]", MAX_RULE_ID_CHARS, required=True) for i, r in enumerate(request.rule_ids)]
        for i, rule_id in enumerate(ids):
            if rule_id not in live.rules:
                raise NotFound(f"rule_ids[{i}] {rule_id!r} is not a rule; nothing was deleted", field=f"rule_ids[{i}]")
        unique = list(dict.fromkeys(ids))
        async with self.holder.catalog_lock:
            token = await self.replica.write_catalog("rules", [{"rule_id": r, "deleted": True} for r in unique], None)
        return pb.DeleteRulesResponse(deleted=len(unique), sequence_token=token)

    async def ListRules(self, request, context):
        live = self.holder.live
        rules = sorted((live.rules if live is not None else {}).values(), key=lambda r: r["rule_id"])
        return pb.ListRulesResponse(rules=[_rule_pb(r) for r in rules])


def _rule_pb(r: dict) -> "pb.Rule":
    """A stored rule record -> pb.Rule."""
    out = pb.Rule(rule_id=r["rule_id"], query=r["query"], match=1 if r["match"] == "contains" else 0)
    if r["kind"] == "synonyms":
        out.synonyms.terms.extend(r["terms"])
        out.synonyms.one_way = r["one_way"]
    elif r["kind"] == "pin":
        out.pin.item_id, out.pin.position = r["item_id"], r["position"]
    elif r["kind"] == "boost":
        out.boost.field, out.boost.value, out.boost.weight = r["field"], r["value"], r["weight"]
    else:
        out.hide.item_id = r["item_id"]
    return out
