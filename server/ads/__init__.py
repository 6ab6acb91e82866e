"""Sponsored products inside Search, Recommend and SimilarItems (docs/ads.md).

- `campaigns`: campaign records, their targeting compiled for serving (`CampaignSet`), eligibility and pacing;
- `auction`: the click model (`CtrModel`) and the auction (`run_auction`: generalized second price with a reserve,
  first price and relevance-only for comparison);
- `ledger`: per-campaign, per-day counters (served, impressions, clicks, spend) and the billing decision, applied
  from the event stream in order, so a replay or another replica reaches the same figures;
- `tokens`: signed auction ids (what was sold, to whom, at what price), so a click needs no lookup to be charged.
"""
