"""Regenerate the project's own sample catalog and judgments (deterministic; no external data).

    python training/sample/make_sample.py

Writes catalog.jsonl (a few hundred products in eight departments, with brands, prices and stock)
judgments.csv (query,item_id,relevance on the 1..3 scale: 3 exact, 2 partly relevant, 1 not) and
interactions.csv (user_id,item_id,timestamp,type: synthetic shoppers, see make_interactions).
Products are built from hand-written product lines so that titles, descriptions and attributes
read like a real home-improvement store; the judgments follow from each product's type.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# department -> product type -> (title templates, variants, price range, brands, description)
LINES = {
    "Power Tools": {
        "cordless drill": (["{brand} {v} Cordless Drill/Driver Kit with 2 Batteries",
                            "{brand} {v} Brushless Cordless Compact Drill"],
                           ["12V", "18V", "20V MAX", "24V"], (59, 229),
                           ["DeWalt", "Milwaukee", "Makita", "Ryobi", "Bosch"],
                           "Compact drill/driver with a 1/2 in. keyless chuck, LED work light and 2-speed gearbox."),
        "corded drill": (["{brand} {v} Corded Drill with Keyless Chuck"], ["6 Amp", "7 Amp", "8 Amp"],
                         (39, 99), ["DeWalt", "Black+Decker", "Skil"],
                         "Variable-speed corded drill for wood, metal and plastic; 3/8 in. chuck."),
        "impact driver": (["{brand} {v} Cordless Impact Driver"], ["12V", "18V", "20V MAX"], (79, 199),
                          ["DeWalt", "Milwaukee", "Makita", "Ryobi"],
                          "1/4 in. hex impact driver with 3 speed settings for driving long screws and lag bolts."),
        "circular saw": (["{brand} {v} Circular Saw", "{brand} {v} Cordless Circular Saw"],
                         ["7-1/4 in.", "6-1/2 in."], (69, 219), ["DeWalt", "Makita", "Skil", "Ryobi"],
                         "Circular saw with carbide-tipped blade, bevel up to 56 degrees and electric brake."),
        "random orbit sander": (["{brand} {v} Random Orbit Sander"], ["5 in.", "6 in."], (39, 129),
                                ["Bosch", "DeWalt", "Makita", "Black+Decker"],
                                "Random orbital sander with hook-and-loop pad and dust collection bag."),
        "angle grinder": (["{brand} {v} Angle Grinder"], ["4-1/2 in.", "5 in."], (35, 149),
                          ["DeWalt", "Milwaukee", "Makita", "Bosch"],
                          "Angle grinder for cutting and grinding metal, with side handle and guard."),
    },
    "Hand Tools": {
        "claw hammer": (["{brand} {v} Fiberglass Claw Hammer", "{brand} {v} Steel Framing Hammer"],
                        ["16 oz.", "20 oz.", "22 oz."], (12, 45), ["Estwing", "Stanley", "Husky"],
                        "Balanced hammer with a curved claw and anti-vibration grip."),
        "screwdriver set": (["{brand} {v} Screwdriver Set"], ["6-Piece", "10-Piece", "14-Piece"], (12, 49),
                            ["Stanley", "Husky", "Klein Tools", "Wera"],
                            "Phillips and slotted screwdrivers with cushion-grip handles and magnetic tips."),
        "tape measure": (["{brand} {v} Tape Measure"], ["16 ft.", "25 ft.", "35 ft."], (8, 29),
                         ["Stanley", "Milwaukee", "Komelon"],
                         "Tape measure with a 1 in. wide blade, belt clip and magnetic hook."),
        "adjustable wrench": (["{brand} {v} Adjustable Wrench"], ["8 in.", "10 in.", "12 in."], (10, 35),
                              ["Crescent", "Husky", "Channellock"],
                              "Chrome-plated adjustable wrench with wide jaw capacity."),
        "utility knife": (["{brand} {v} Retractable Utility Knife"], ["Folding", "Quick-Change"], (7, 24),
                          ["Stanley", "Milwaukee", "Husky"],
                          "Utility knife with tool-free blade change and 5 spare blades."),
        "level": (["{brand} {v} Box Level", "{brand} {v} Torpedo Level"], ["9 in.", "24 in.", "48 in."],
                  (9, 69), ["Empire", "Stanley", "Johnson"],
                  "Aluminium level with shock-resistant end caps and easy-read vials."),
    },
    "Kitchen": {
        "chef knife": (["{brand} {v} Chef's Knife"], ["6 in.", "8 in.", "10 in."], (25, 160),
                       ["Wusthof", "Victorinox", "Henckels", "Cuisinart"],
                       "Forged stainless steel chef's knife for chopping, slicing and dicing."),
        "cookware set": (["{brand} {v} Nonstick Cookware Set", "{brand} {v} Stainless Steel Cookware Set"],
                         ["10-Piece", "12-Piece", "15-Piece"], (89, 399),
                         ["Calphalon", "T-fal", "Cuisinart", "All-Clad"],
                         "Pots and pans with glass lids, oven safe and dishwasher safe."),
        "blender": (["{brand} {v} Countertop Blender"], ["48 oz.", "64 oz.", "72 oz."], (49, 449),
                    ["Vitamix", "Ninja", "Oster", "KitchenAid"],
                    "High-speed blender for smoothies, soups and crushed ice."),
        "coffee maker": (["{brand} {v} Programmable Coffee Maker", "{brand} {v} Drip Coffee Maker"],
                         ["12-Cup", "14-Cup", "5-Cup"], (29, 159), ["Cuisinart", "Mr. Coffee", "Keurig", "Braun"],
                         "Brews hot coffee with a keep-warm plate, brew-strength control and auto shut-off."),
        "stand mixer": (["{brand} {v} Tilt-Head Stand Mixer"], ["4.5 qt.", "5 qt.", "6 qt."], (199, 499),
                        ["KitchenAid", "Cuisinart", "Hamilton Beach"],
                        "Stand mixer with flat beater, dough hook and wire whip for baking."),
        "kitchen faucet": (["{brand} {v} Pull-Down Kitchen Faucet"], ["Single-Handle", "Touchless"], (99, 349),
                           ["Moen", "Delta", "Kohler", "Pfister"],
                           "Kitchen sink faucet with pull-down sprayer and spot-resistant stainless finish."),
    },
    "Garden": {
        "garden hose": (["{brand} {v} Garden Hose"], ["50 ft.", "75 ft.", "100 ft."], (19, 79),
                        ["Flexzilla", "Gilmour", "Teknor Apex"],
                        "Kink-resistant 5/8 in. water hose with crush-proof brass fittings."),
        "lawn mower": (["{brand} {v} Gas Walk Behind Push Lawn Mower", "{brand} {v} Cordless Electric Lawn Mower"],
                       ["21 in.", "20 in.", "22 in."], (199, 549), ["Honda", "Toro", "Ryobi", "EGO"],
                       "Walk-behind mower with 3-in-1 mulch, bag and side discharge and adjustable cutting height."),
        "string trimmer": (["{brand} {v} String Trimmer"], ["40V", "56V", "Gas 25cc"], (79, 249),
                           ["EGO", "Ryobi", "Echo", "Toro"],
                           "Line trimmer (weed eater) with bump feed head for edging lawns and cutting weeds."),
        "pruning shears": (["{brand} {v} Bypass Pruning Shears"], ["Titanium", "Steel", "Ratchet"], (12, 49),
                           ["Fiskars", "Corona", "Felco"],
                           "Hand pruner for cutting branches up to 3/4 in. thick in the garden."),
        "raised garden bed": (["{brand} {v} Cedar Raised Garden Bed"], ["4 ft. x 4 ft.", "2 ft. x 8 ft."],
                              (59, 189), ["Greenes Fence", "Vego Garden"],
                              "Raised planter box for vegetables and flowers, tool-free assembly."),
        "potting soil": (["{brand} {v} Potting Mix"], ["8 qt.", "1 cu. ft.", "2 cu. ft."], (6, 24),
                         ["Miracle-Gro", "FoxFarm", "Espoma"],
                         "Organic potting soil for container plants with slow-release plant food."),
    },
    "Lighting": {
        "led bulb": (["{brand} {v} LED Light Bulb Daylight (4-Pack)", "{brand} {v} LED Light Bulb Soft White (8-Pack)"],
                     ["60-Watt Equivalent A19", "100-Watt Equivalent A21", "40-Watt Equivalent B11"], (9, 39),
                     ["Philips", "GE", "Cree", "Feit Electric"],
                     "Dimmable energy-saving LED bulbs with a 15-year life."),
        "ceiling fan": (["{brand} {v} Indoor Ceiling Fan with LED Light Kit"], ["44 in.", "52 in.", "60 in."],
                        (89, 399), ["Hunter", "Hampton Bay", "Minka-Aire"],
                        "Ceiling fan with remote control, reversible motor and integrated LED light."),
        "pendant light": (["{brand} {v} Pendant Light"], ["1-Light Black", "3-Light Brushed Nickel", "1-Light Brass"],
                          (39, 249), ["Progress Lighting", "Hampton Bay", "Globe Electric"],
                          "Hanging pendant light fixture for kitchen islands and dining rooms."),
        "solar path light": (["{brand} {v} Solar LED Path Light"], ["6-Pack", "8-Pack", "12-Pack"], (19, 69),
                             ["Hampton Bay", "Sunforce", "Moonrays"],
                             "Outdoor solar-powered landscape lights for walkways and gardens."),
        "desk lamp": (["{brand} {v} LED Desk Lamp"], ["Adjustable", "Clamp", "USB Charging"], (19, 89),
                      ["TaoTronics", "Globe Electric", "Philips"],
                      "Desk lamp with dimmable LED, adjustable arm and touch control."),
        "floodlight": (["{brand} {v} LED Motion Sensor Security Flood Light"], ["2-Head", "3-Head"], (29, 99),
                       ["Halo", "Defiant", "Lithonia Lighting"],
                       "Outdoor security light with motion sensor and adjustable heads."),
    },
    "Furniture": {
        "office chair": (["{brand} {v} Ergonomic Office Chair", "{brand} {v} Mesh Task Chair"],
                         ["Black", "Gray", "High-Back"], (89, 499), ["Herman Miller", "HON", "Serta", "Flash Furniture"],
                         "Office desk chair with lumbar support, adjustable armrests and tilt."),
        "patio dining set": (["{brand} {v} Outdoor Patio Dining Set"], ["5-Piece", "7-Piece", "3-Piece Bistro"],
                             (199, 1299), ["Hampton Bay", "StyleWell", "Polywood"],
                             "Weather-resistant patio table and chairs for outdoor dining."),
        "bookcase": (["{brand} {v} Bookcase"], ["3-Shelf", "5-Shelf", "6-Cube"], (49, 249),
                     ["Sauder", "StyleWell", "Ameriwood"],
                     "Wood bookshelf with adjustable shelves for books and display."),
        "tv stand": (["{brand} {v} TV Stand"], ["55 in.", "65 in.", "70 in."], (89, 399),
                     ["Walker Edison", "Sauder", "StyleWell"],
                     "Entertainment center media console with cable management and storage."),
        "storage bench": (["{brand} {v} Entryway Storage Bench"], ["Wood", "Upholstered"], (69, 229),
                          ["StyleWell", "Linon", "HomePop"],
                          "Bench seat with shoe storage for mudroom and entryway."),
        "standing desk": (["{brand} {v} Electric Standing Desk"], ["48 in.", "55 in.", "60 in."], (199, 599),
                          ["FlexiSpot", "Uplift", "Vari"],
                          "Height-adjustable sit-stand desk with memory presets."),
    },
    "Bath": {
        "shower head": (["{brand} {v} Rain Shower Head", "{brand} {v} Handheld Shower Head"],
                        ["8 in.", "6-Spray", "10 in."], (25, 149), ["Moen", "Delta", "Kohler", "Waterpik"],
                        "High-pressure shower head with multiple spray settings and anti-clog nozzles."),
        "toilet": (["{brand} {v} Elongated Toilet"], ["2-Piece 1.28 GPF", "1-Piece 1.1 GPF", "Dual Flush"],
                   (149, 499), ["American Standard", "Kohler", "TOTO", "Glacier Bay"],
                   "Comfort-height toilet with powerful flush and soft-close seat."),
        "bathroom vanity": (["{brand} {v} Bathroom Vanity with Sink"], ["24 in.", "36 in.", "48 in."],
                            (199, 899), ["Glacier Bay", "Home Decorators Collection", "Foremost"],
                            "Bath vanity cabinet with cultured marble top and soft-close doors."),
        "bathroom faucet": (["{brand} {v} Bathroom Sink Faucet"], ["Centerset", "Single Hole", "Widespread"],
                            (39, 229), ["Moen", "Delta", "Pfister", "Glacier Bay"],
                            "Two-handle lavatory faucet with drain assembly, brushed nickel."),
        "towel bar": (["{brand} {v} Towel Bar"], ["18 in.", "24 in.", "30 in."], (12, 59),
                      ["Moen", "Franklin Brass", "Delta"],
                      "Wall-mounted bathroom towel rack in matte black or chrome."),
        "exhaust fan": (["{brand} {v} Bathroom Exhaust Fan"], ["80 CFM", "110 CFM", "50 CFM"], (29, 189),
                        ["Broan-NuTone", "Panasonic", "Delta Breez"],
                        "Quiet ceiling ventilation fan that removes moisture and odour."),
    },
    "Paint": {
        "interior paint": (["{brand} {v} Interior Paint and Primer", "{brand} {v} Interior Eggshell Paint"],
                           ["1 gal. White", "1 gal. Gray", "5 gal. Ultra White"], (29, 199),
                           ["Behr", "Glidden", "Valspar", "Sherwin-Williams"],
                           "Washable, low-VOC wall paint with one-coat hide."),
        "exterior stain": (["{brand} {v} Exterior Wood Stain"], ["1 gal. Semi-Transparent", "1 gal. Solid Color"],
                           (29, 69), ["Behr", "Thompson's WaterSeal", "Cabot"],
                           "Deck and fence stain and sealer with UV protection."),
        "paint roller": (["{brand} {v} Paint Roller Kit"], ["9 in.", "4 in. Mini", "18 in."], (7, 29),
                         ["Wooster", "Purdy", "Linzer"],
                         "Roller frame, covers and tray for smooth walls and ceilings."),
        "paint brush": (["{brand} {v} Angled Paint Brush"], ["2 in.", "2-1/2 in.", "3 in."], (6, 24),
                        ["Purdy", "Wooster", "Linzer"],
                        "Angled sash brush with nylon-polyester bristles for cutting in trim."),
        "spray paint": (["{brand} {v} Spray Paint"], ["12 oz. Gloss Black", "12 oz. Flat White", "12 oz. Satin Blue"],
                        (5, 12), ["Rust-Oleum", "Krylon"],
                        "Fast-drying aerosol enamel for metal, wood and plastic."),
        "painter's tape": (["{brand} {v} Painter's Tape"], ["1.88 in. x 60 yd.", "0.94 in. x 60 yd."], (5, 15),
                           ["ScotchBlue", "FrogTape", "Duck"],
                           "Blue masking tape that removes cleanly for sharp paint lines."),
    },
}
STOCK_OUT_RATE = 0.12

# query -> (product types judged 3, product types judged 2, extra word an exact match must contain)
QUERIES = {
    "cordless drill": (["cordless drill"], ["impact driver", "corded drill"], None),
    "impact driver": (["impact driver"], ["cordless drill"], None),
    "circular saw": (["circular saw"], ["angle grinder"], None),
    "orbital sander": (["random orbit sander"], [], None),
    "claw hammer": (["claw hammer"], [], None),
    "25 ft tape measure": (["tape measure"], [], None),
    "chef knife": (["chef knife"], [], None),
    "nonstick pots and pans": (["cookware set"], [], None),
    "smoothie blender": (["blender"], [], None),
    "coffee maker": (["coffee maker"], [], None),
    "kitchen faucet pull down": (["kitchen faucet"], ["bathroom faucet"], None),
    "garden hose 100 ft": (["garden hose"], [], None),
    "push lawn mower": (["lawn mower"], ["string trimmer"], None),
    "weed eater": (["string trimmer"], ["lawn mower"], None),
    "led light bulbs": (["led bulb"], ["desk lamp", "floodlight", "solar path light"], None),
    "ceiling fan with light": (["ceiling fan"], ["pendant light"], None),
    "outdoor solar lights": (["solar path light"], ["floodlight"], None),
    "ergonomic office chair": (["office chair"], ["standing desk"], None),
    "patio table and chairs": (["patio dining set"], [], None),
    "rain shower head": (["shower head"], [], None),
    "bathroom vanity with sink": (["bathroom vanity"], ["bathroom faucet"], None),
    "white interior paint": (["interior paint"], ["spray paint", "paint roller"], None),
    "deck stain": (["exterior stain"], [], None),
    "painters tape": (["painter's tape"], [], None),
    "dewalt drill": (["cordless drill", "corded drill"], ["impact driver"], "DeWalt"),
}


def make_catalog(rng: random.Random) -> list[dict]:
    items = []
    for department, lines in LINES.items():
        for ptype, (templates, variants, (lo, hi), brands, description) in lines.items():
            for brand in brands:
                for variant in rng.sample(variants, k=min(len(variants), 2)):
                    template = rng.choice(templates)
                    price = round(rng.uniform(lo, hi), 0) - 0.01
                    items.append({
                        "item_id": f"SR-{len(items) + 1:05d}",
                        "title": template.format(brand=brand, v=variant),
                        "description": description,
                        "category": department,
                        "brand": brand,
                        "price": price,
                        "in_stock": rng.random() > STOCK_OUT_RATE,
                        "attributes": {"product_type": ptype, "size": variant},
                    })
    return items


def make_judgments(items: list[dict], rng: random.Random) -> list[tuple[str, str, int]]:
    rows = []
    for query, (exact, partial, must) in QUERIES.items():
        for item in items:
            ptype = item["attributes"]["product_type"]
            if ptype in exact and (must is None or item["brand"] == must):
                rows.append((query, item["item_id"], 3))
            elif ptype in exact or ptype in partial:
                rows.append((query, item["item_id"], 2))
        # A few judged-irrelevant items from other product types, as raters see them.
        others = [i for i in items if i["attributes"]["product_type"] not in exact + partial]
        rows.extend((query, i["item_id"], 1) for i in rng.sample(others, k=3))
    return rows


def make_interactions(items: list[dict], rng: random.Random, users: int = 400) -> list[tuple[str, str, int, str]]:
    """Synthetic shoppers: each works on one or two departments, moving from a product type to the
    next one of its department (drill -> impact driver -> ...) and often staying with one brand, so
    the sequences have the order and affinities a sequential recommender should pick up."""
    by_type: dict[tuple[str, str], list[dict]] = {}
    for it in items:
        by_type.setdefault((it["category"], it["attributes"]["product_type"]), []).append(it)
    types = {d: [t for (dd, t) in by_type if dd == d] for d in LINES}
    rows = []
    start = 1_767_225_600  # 2026-01-01 UTC
    for u in range(users):
        user = f"U{u + 1:04d}"
        depts = rng.sample(sorted(types), k=rng.choice((1, 1, 2)))
        t = start + rng.randrange(0, 300 * 86400)
        brand = None
        had: set[str] = set()
        for dept in depts:
            i = rng.randrange(len(types[dept]))
            for _ in range(rng.randint(3, 9)):
                pool = [p for p in by_type[(dept, types[dept][i % len(types[dept])])] if p["item_id"] not in had]
                if not pool:
                    i += 1
                    continue
                same = [p for p in pool if p["brand"] == brand]
                item = rng.choice(same if same and rng.random() < 0.6 else pool)
                brand = item["brand"]
                had.add(item["item_id"])
                kind = rng.choices(("view", "click", "add_to_cart", "purchase"), (5, 3, 1, 2))[0]
                rows.append((user, item["item_id"], t, kind))
                t += rng.randrange(60, 3 * 86400)
                if rng.random() < 0.7:
                    i += 1  # on to the next product type of the project
    return rows


def main() -> None:
    rng = random.Random(20261127)
    items = make_catalog(rng)
    with open(HERE / "catalog.jsonl", "w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item) + "\n")
    with open(HERE / "judgments.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query", "item_id", "relevance"])
        writer.writerows(make_judgments(items, rng))
    events = make_interactions(items, random.Random(20261128))
    with open(HERE / "interactions.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_id", "item_id", "timestamp", "type"])
        writer.writerows(events)
    print(f"{len(items)} items, {len(QUERIES)} queries, {len(events)} interactions -> {HERE}")


if __name__ == "__main__":
    main()
