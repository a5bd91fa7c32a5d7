"""Synthetic three-service data (grocery, marketplace, delivery) with planted, measurable structure.

Why: real multi-service logs are rare and their ground truth unknown. This generator writes the
same events + catalogue tables as the real sources, at any size, with structure that later model
tests can check a recommender has learned.

Planted structure:

* **Topics.** :data:`TOPICS` names 16 latent tastes (healthy, baby, pets, cooking, outdoor, ...);
  ``num_topics`` uses the first ones. Each item belongs to one topic and one of that topic's three
  categories in its service; its ``categories`` are ``[department, category]``, the department
  naming the topic (``["Healthy living", "dairy alternatives"]``).
* **Users.** Each user is active in one, two or three services (``share_two_services``,
  ``share_three_services``; grocery is the most used, then marketplace, then delivery) and has a
  sparse taste: 1..``max_topics_per_user`` topics with Dirichlet(1) weights, *the same in every
  service*. An event's topic is drawn from that taste, or with ``off_taste_prob`` from the global
  topic popularity. So a user's topics in one service predict their topics in the others.
* **Popularity.** Topics have mild popularity ``1 / (t + 1) ** 0.5`` (for tastes and off-taste
  events); within a ``(service, topic)`` items are ranked at random and drawn by Zipf
  (``zipf_exponent``) over rank, so item popularity is heavy-tailed.
* **Repeats.** An event that is not the first of its ``(user, service)`` history re-buys, with
  ``<service>_repeat_prob``, an item drawn uniformly from that history's earlier events (often
  bought items are re-bought more); otherwise it buys an item new to that history (on a collision
  redrawn once by Zipf, then uniformly in the topic, then, for a long history that has bought its
  topic out, uniformly in the service; after ``MAX_REDRAWS`` a leftover counts as a repeat). So
  the measured repeat rate is the configured one: by default grocery 0.45, delivery 0.25,
  marketplace 0.03.
* **Quantities and prices.** Quantity is geometric with a per-service mean (grocery 1.8,
  delivery 1.3, marketplace 1.05); an event's price is its item's unit price, lognormal around a
  per-service median (grocery 3.5, delivery 14, marketplace 35) with a per-category level.
* **Sessions and time.** A user's events come in sessions of geometric size (mean
  ``mean_events_per_session``), each in one service, events 20 s + ~2.5 min apart; sessions are
  at least an hour apart (mean ``session_gap_hours``); the first starts within 30 days after
  ``start_timestamp``. Sessions of different services interleave in time. All events are
  ``purchase`` events with real unix timestamps.
* **Text.** Title ``"Organic oat milk 1L"`` (topic attribute, category noun, service size), text
  ``"Organic oat milk 1L — brand Meadowvale — dairy alternatives, vegan, high-fibre"``. Attribute
  words are topic-specific, nouns category-specific, and each service has its own brand
  vocabulary with three brands per topic, so semantic IDs learned from text can recover topics
  and categories.

How: users are simulated in blocks of ``users_per_shard``, vectorised with numpy; each block's
``(user, service)`` histories go through :func:`moe_rec.data.histories.order_and_split` (the same
ordering and leave-one-out rules as the real sources), become one Parquet shard and are dropped,
so memory is bounded by the block, not the run. Every random number is a counter-based hash of
``(seed, user index, stream, counter)``: the same config gives byte-identical tables, another seed
other data, and a user's rows do not depend on ``users_per_shard`` (only where shards are cut).
Nothing is rejected, so ``rows_read == rows_kept``; ``one_event_histories`` appear in the notes.
"""

from __future__ import annotations

import enum
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from moe_rec.config import ConfigError
from moe_rec.console import progress
from moe_rec.data import store
from moe_rec.data.config import DataConfig, SyntheticConfig
from moe_rec.data.histories import order_and_split
from moe_rec.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, DataError, ReadReport

SERVICES = ("grocery", "marketplace", "delivery")
SERVICE_ORDER = np.argsort(np.argsort(SERVICES))  # service code -> rank of its name (order within a user)
EVENT_TYPE = "purchase"
MAX_REDRAWS = 8  # redraws of a "new" item that the history already has
START_SPREAD_S = 30 * 86_400  # users' first sessions are spread over this many seconds
TOPIC_POPULARITY_EXPONENT = 0.5  # topic t has popularity 1 / (t + 1) ** this
BRANDS_PER_TOPIC = 3  # brands per (service, topic)


# ---------------------------------------------------------------------------------------------
# Vocabulary: services and topics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceProfile:
    """How one service looks: usage weight, ids, prices, quantities, sizes and brand vocabulary."""

    weight: float  # how likely a user uses it, and how often among the user's services
    id_prefix: str  # item ids are <prefix><number>
    price_median: float  # median unit price
    quantity_mean: float  # mean of the (geometric, >= 1) quantity per event
    sizes: tuple[str, ...]  # size words ending a title
    brand_heads: tuple[str, ...]  # brand names are head + tail (heads x tails >= 16 * BRANDS_PER_TOPIC)
    brand_tails: tuple[str, ...]


PROFILES = {
    "grocery": ServiceProfile(
        weight=0.5,
        id_prefix="g",
        price_median=3.5,
        quantity_mean=1.8,
        sizes=("250g", "500g", "1kg", "1L", "6-pack", "family size"),
        brand_heads=tuple(
            "Green Sun Meadow Harvest Golden River Oak Maple Clover Honey Willow Brook".split()
        ),
        brand_tails=("field", "vale", "farm", "acre", "dale"),
    ),
    "marketplace": ServiceProfile(
        weight=0.3,
        id_prefix="m",
        price_median=35.0,
        quantity_mean=1.05,
        sizes=("compact", "large", "set of 2", "pro", "mini", "XL"),
        brand_heads=tuple("Nova Apex Zen Urban Peak Lumo Axis Vertex Orbit Kite Polar Cobalt".split()),
        brand_tails=("ware", "line", "craft", "works", "lab"),
    ),
    "delivery": ServiceProfile(
        weight=0.2,
        id_prefix="d",
        price_median=14.0,
        quantity_mean=1.3,
        sizes=("regular", "large", "for two", "small", "family", "single"),
        brand_heads=tuple("Bolt Zip Hop Sprint Jet Pronto Bee Lark Fox Otter Hare Wren".split()),
        brand_tails=(" Express", " Kitchen", " Go", " Now", " Box"),
    ),
}


@dataclass(frozen=True)
class Topic:
    """A latent taste: its department name, attribute words and, per service, categories -> nouns."""

    name: str
    department: str
    attributes: tuple[str, ...]
    categories: dict[str, dict[str, tuple[str, ...]]]


def _topic(name: str, department: str, attributes: str, **services: str) -> Topic:
    """Parse ``"category: noun, noun; category: noun, ..."`` per service into a :class:`Topic`."""
    categories = {}
    for service, spec in services.items():
        pairs = (part.split(":") for part in spec.split(";"))
        categories[service] = {
            cat.strip(): tuple(n.strip() for n in nouns.split(",")) for cat, nouns in pairs
        }
    return Topic(name, department, tuple(a.strip() for a in attributes.split(",")), categories)


# fmt: off
TOPICS = (
    _topic("healthy", "Healthy living", "organic, vegan, low-sugar, high-fibre, gluten-free",
           grocery="cereals & granola: granola, muesli, oat flakes; dairy alternatives: oat milk, almond milk, "
                   "soy yoghurt; superfoods: chia seeds, quinoa, goji berries",
           marketplace="juicers & blenders: cold-press juicer, smoothie blender, nut milk maker; supplements: "
                       "vitamin D capsules, plant protein powder, omega-3 softgels; meal prep: glass meal prep "
                       "boxes, salad spinner, sprouting jar",
           delivery="salad bowls: kale caesar bowl, quinoa power bowl, falafel bowl; smoothies & juices: green "
                    "smoothie, cold-pressed juice, acai bowl; poke: salmon poke, tofu poke, tuna poke"),
    _topic("baby", "Baby & toddler", "gentle, hypoallergenic, fragrance-free, newborn, toddler",
           grocery="nappies & wipes: nappies, baby wipes, nappy cream; baby food: fruit puree pouch, baby "
                   "porridge, teething rusks; formula: infant formula, follow-on milk, toddler milk",
           marketplace="strollers: travel stroller, jogging stroller, pram; nursery: baby monitor, cot mattress, "
                       "changing table; feeding: bottle steriliser, high chair, silicone bib",
           delivery="baby pharmacy: baby paracetamol, saline drops, teething gel; kids meals: kids pasta plate, "
                    "mini pizza, fish fingers meal; baby essentials: nappy pack, wipes pack, formula tin"),
    _topic("pets", "Pets", "grain-free, for dogs, for cats, puppy, senior pet",
           grocery="pet food: dry dog food, wet cat food, puppy kibble; pet treats: dental chews, cat treats, "
                   "chew sticks; litter: clumping cat litter, poop bags, litter liner",
           marketplace="beds & crates: orthopedic dog bed, travel crate, cat tree; pet toys: squeaky toy, laser "
                       "pointer, puzzle feeder; grooming: deshedding brush, nail clipper, pet shampoo",
           delivery="pet shop: dog food bag, cat food tray, bird seed; vet pharmacy: flea drops, worming tablets, "
                    "joint supplement; pet bakery: dog birthday cake, paw biscuits, cat cookies"),
    _topic("cooking", "Home cooking", "extra virgin, cast-iron, stainless steel, chef-grade, aromatic",
           grocery="oils & vinegars: olive oil, balsamic vinegar, sesame oil; spices: smoked paprika, cumin, "
                   "black pepper; stocks & sauces: chicken stock, tomato passata, worcestershire sauce",
           marketplace="cookware: cast-iron skillet, dutch oven, saucepan set; knives: chef knife, santoku knife, "
                       "knife sharpener; kitchen appliances: slow cooker, air fryer, food processor",
           delivery="meal kits: steak dinner kit, roast chicken kit, stew kit; butcher: ribeye steak, lamb chops, "
                    "minced beef; fresh herbs: basil bunch, rosemary, coriander"),
    _topic("outdoor", "Outdoor & camping", "waterproof, lightweight, insulated, ultralight, all-weather",
           grocery="bbq: charcoal briquettes, firelighters, bbq sausages; camping food: freeze-dried meal, beef "
                   "jerky, trail mix; insect care: insect repellent, after-sun, citronella candle",
           marketplace="tents: dome tent, backpacking tent, tarp shelter; sleeping gear: sleeping bag, sleeping "
                       "pad, camping hammock; hiking: hiking boots, trekking poles, daypack",
           delivery="outdoor shop: gas canister, head torch, rain poncho; bbq delivery: bbq meat box, grilled "
                    "corn, smoked brisket; ice & drinks: ice bag, cool box drinks, water jug"),
    _topic("fitness", "Sports & fitness", "high-protein, sugar-free, breathable, adjustable, anti-slip",
           grocery="protein: protein bar, whey shake, protein yoghurt; sports drinks: electrolyte drink, isotonic "
                   "drink, energy gel; lean foods: rice cakes, egg whites, turkey slices",
           marketplace="weights: adjustable dumbbells, kettlebell, weight plates; yoga: yoga mat, yoga blocks, "
                       "resistance bands; running: running shoes, fitness tracker, running belt",
           delivery="protein meals: chicken rice bowl, protein pancakes, steak and sweet potato; shakes: "
                    "post-workout shake, peanut butter shake, mass gainer shake; sports pharmacy: muscle rub, "
                    "kinesiology tape, magnesium tablets"),
    _topic("beauty", "Beauty & personal care", "nourishing, cruelty-free, hydrating, dermatologist-tested, "
           "paraben-free",
           grocery="hair care: shampoo, conditioner, hair mask; skin care: moisturiser, face wash, body lotion; "
                   "oral care: toothpaste, toothbrush heads, mouthwash",
           marketplace="makeup: lipstick, mascara, foundation; hair tools: hair dryer, straightener, curling "
                       "wand; fragrance: eau de parfum, body mist, perfume gift set",
           delivery="beauty express: sheet face mask, nail polish, makeup remover; pharmacy care: lip balm, "
                    "hand cream, eye drops; grooming: razor blades, shaving foam, beard oil"),
    _topic("cleaning", "Home & cleaning", "eco, concentrated, antibacterial, lemon-scented, refillable",
           grocery="laundry: laundry detergent, fabric softener, stain remover; surface cleaners: multi-surface "
                   "spray, bleach, bathroom cleaner; paper goods: kitchen roll, toilet paper, bin bags",
           marketplace="vacuums: robot vacuum, cordless vacuum, steam mop; storage: storage boxes, shoe rack, "
                       "drawer organiser; laundry gear: drying rack, ironing board, laundry basket",
           delivery="cleaning express: dish soap, scrub sponges, rubber gloves; laundry express: detergent pods, "
                    "dryer sheets, lint roller; air care: air freshener, scented candle, reed diffuser"),
    _topic("coffee", "Coffee & tea", "single-origin, decaf, dark roast, fair-trade, loose-leaf",
           grocery="coffee: ground coffee, coffee beans, instant coffee; tea: green tea, earl grey, chamomile "
                   "tea; coffee extras: coffee pods, oat creamer, caramel syrup",
           marketplace="espresso machines: espresso machine, milk frother, burr grinder; brewing: french press, "
                       "pour-over kettle, moka pot; tea ware: teapot, tea infuser, matcha whisk",
           delivery="cafe drinks: flat white, iced latte, cappuccino; tea house: bubble tea, chai latte, matcha "
                    "latte; cafe pastries: croissant, pain au chocolat, cinnamon roll"),
    _topic("party", "Party & entertaining", "festive, reusable, assorted, sharing-size, glittery",
           grocery="party snacks: tortilla chips, salsa dip, party nuts; soft drinks: cola multipack, tonic "
                   "water, lemonade; tableware: paper plates, party cups, napkins",
           marketplace="decorations: balloon arch kit, fairy lights, bunting; party games: board game, karaoke "
                       "machine, card game; hosting: drinks dispenser, serving platter, cocktail shaker",
           delivery="party platters: sandwich platter, mezze platter, canape box; pizza: pepperoni pizza, bbq "
                    "chicken pizza, garlic bread; party supplies: balloons, party poppers, candles"),
    _topic("asian", "Asian cuisine", "spicy, umami, authentic, wok-fried, fermented",
           grocery="noodles & rice: jasmine rice, ramen noodles, rice noodles; asian sauces: soy sauce, "
                   "sriracha, miso paste; asian pantry: coconut milk, nori sheets, kimchi",
           marketplace="asian cookware: carbon steel wok, rice cooker, bamboo steamer; asian tableware: "
                       "chopsticks set, ramen bowls, sushi making kit; hot pot: hot pot, dumpling maker, "
                       "takoyaki pan",
           delivery="sushi: salmon nigiri, california roll, sushi platter; noodles: pad thai, ramen, chow mein; "
                    "curries: green curry, katsu curry, butter chicken"),
    _topic("baking", "Baking & desserts", "vanilla, chocolate, fluffy, buttery, golden",
           grocery="flour & sugar: plain flour, caster sugar, bread flour; baking essentials: baking powder, "
                   "vanilla extract, dried yeast; decorations: dark chocolate chips, sprinkles, icing sugar",
           marketplace="bakeware: cake tin, muffin tray, loaf pan; baking tools: stand mixer, rolling pin, piping "
                       "bags; bread making: proving basket, bread machine, dough scraper",
           delivery="cakes: fudge cake, cheesecake, carrot cake; desserts: tiramisu, brownies, ice cream tub; "
                    "bakery: sourdough loaf, bagels, baguette"),
    _topic("garden", "Garden & plants", "perennial, frost-hardy, peat-free, flowering, evergreen",
           grocery="seeds & bulbs: herb seeds, tulip bulbs, tomato seeds; garden care: plant food, slug pellets, "
                   "compost; fresh flowers: tulip bouquet, rose bunch, sunflowers",
           marketplace="garden tools: pruning shears, garden hose, spade; garden furniture: garden bench, rattan "
                       "sofa, parasol; planters: raised bed, hanging basket, ceramic planter",
           delivery="flower delivery: rose bouquet, orchid pot, peony bunch; houseplants: monstera, snake plant, "
                    "pothos; garden express: potting soil, watering can, plant mister"),
    _topic("tech", "Tech & gadgets", "wireless, rechargeable, USB-C, bluetooth, smart",
           grocery="batteries: AA batteries, AAA batteries, button cells; cables: charging cable, phone "
                   "charger, HDMI cable; home tech: LED bulb, smart plug, extension lead",
           marketplace="audio: wireless earbuds, bluetooth speaker, noise-cancelling headphones; computing: "
                       "laptop stand, mechanical keyboard, wireless mouse; smart home: smart speaker, video "
                       "doorbell, smart thermostat",
           delivery="gadget express: power bank, phone case, screen protector; gaming: game controller, gaming "
                    "headset, memory card; repair: phone repair kit, screwdriver set, spare fuse"),
    _topic("wine", "Wine & spirits", "vintage, dry, full-bodied, oak-aged, small-batch",
           grocery="red wine: merlot, rioja, pinot noir; white wine: sauvignon blanc, chardonnay, pinot grigio; "
                   "spirits: gin, whisky, vodka",
           marketplace="wine accessories: wine decanter, corkscrew, wine aerator; glassware: wine glasses, whisky "
                       "tumblers, champagne flutes; wine storage: wine fridge, wine rack, bottle cooler",
           delivery="wine delivery: prosecco, rose wine, champagne; cocktails: margarita kit, mojito, negroni; "
                    "beer: craft IPA, lager pack, cider"),
    _topic("reading", "Books & stationery", "hardcover, illustrated, recycled, A5, bestselling",
           grocery="stationery: notebooks, ballpoint pens, sticky notes; cards & wrap: birthday card, wrapping "
                   "paper, gift tags; magazines: cooking magazine, puzzle book, newspaper",
           marketplace="books: crime novel, cookbook, picture book; e-readers: e-reader, reading light, book "
                       "stand; art supplies: watercolour set, sketchbook, fountain pen",
           delivery="print & copy: printed photos, poster print, document printing; office express: printer "
                    "paper, ink cartridge, envelopes; gift express: gift box, greeting card, bookshop voucher"),
)
# fmt: on


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers: one stream per (seed, user, purpose), indexable by counter
# ---------------------------------------------------------------------------------------------


class Stream(enum.IntEnum):
    """What a random number is for; with a counter (slot, session or event index) it names one draw."""

    NUM_SERVICES = 1
    SERVICE_RACE = 2
    NUM_TOPICS = 3
    TOPIC_RACE = 4
    TOPIC_WEIGHT = 5
    NUM_SESSIONS = 6
    SESSION_SERVICE = 7
    SESSION_SIZE = 8
    SESSION_GAP = 9
    EVENT_GAP = 10
    OFF_TASTE = 11
    TOPIC = 12
    REPEAT = 13
    REPEAT_PICK = 14
    QUANTITY = 15
    ITEM = 16  # ITEM + r for the r-th redraw


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection on uint64 arrays that scrambles every bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _user_keys(seed: int, users: np.ndarray) -> np.ndarray:
    """One 64-bit key per user index (distinct per user: ``_mix`` is a bijection)."""
    seed_key = np.random.SeedSequence(seed).generate_state(1, np.uint64)
    return _mix(seed_key ^ users.astype(np.uint64))


def _uniform(keys: np.ndarray, stream: int, counter: np.ndarray | int) -> np.ndarray:
    """Uniform numbers in [0, 1), one per ``(key, stream, counter)``, broadcast like the arguments."""
    c = (np.uint64(stream) << np.uint64(40)) | np.atleast_1d(np.asarray(counter, dtype=np.uint64))
    return (_mix(keys ^ _mix(c)) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _geometric(u: np.ndarray, mean: float | np.ndarray) -> np.ndarray:
    """Geometric numbers >= 1 with the given mean, by inverting the CDF at ``u``."""
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), u.shape)
    out = np.ones(u.shape, dtype=np.int64)
    more = mean > 1.0
    out[more] += np.floor(np.log1p(-u[more]) / np.log1p(-1.0 / mean[more])).astype(np.int64)
    return out


def _exponential(u: np.ndarray, mean: float) -> np.ndarray:
    """Exponential numbers with the given mean, by inverting the CDF at ``u``."""
    return -np.log1p(-u) * mean


def _pick(u: np.ndarray, cum: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Slot chosen by ``u`` from rows of cumulative weights ``cum`` (R, K), among the first ``count``."""
    return np.minimum((u[:, None] >= cum).sum(axis=1), count - 1)


# ---------------------------------------------------------------------------------------------
# Catalogue
# ---------------------------------------------------------------------------------------------


@dataclass
class Catalogue:
    """All configured services' items as flat arrays (row = catalogue index) plus Zipf tables.

    Segment ``service_code * num_topics + topic`` holds a ``(service, topic)``'s items in popularity
    order; ``seg_cdf`` is the segment index plus the Zipf CDF inside it, so one ``searchsorted``
    draws items for many segments at once.
    """

    table: pa.Table  # ITEM_SCHEMA, sorted by (service, item_id)
    item_ids: np.ndarray  # (I,) object: item id strings
    price: np.ndarray  # (I,) float32 unit prices
    seg_items: np.ndarray  # (I,) catalogue rows in (segment, popularity rank) order
    seg_cdf: np.ndarray  # (I,) segment + cumulative Zipf probability, aligned with seg_items
    num_topics: int
    seg_start: np.ndarray  # (S,) start of each segment in seg_items
    seg_end: np.ndarray  # (S,) end of each segment in seg_items


def _service_items(cfg: SyntheticConfig, service: str) -> tuple[list[tuple], list[np.ndarray]]:
    """One service's items, deterministic in ``(seed, service)``.

    Returns:
        rows ``(item_id, title, categories, brand, price, text)`` in id order, and per topic its
        item numbers from most to least popular.
    """
    num_topics, n = cfg.num_topics, cfg.items_per_service
    profile = PROFILES[service]
    rng = np.random.default_rng([cfg.seed, 1, SERVICES.index(service)])
    heads, tails = profile.brand_heads, profile.brand_tails
    brands = [
        heads[k // len(tails)] + tails[k % len(tails)] for k in rng.permutation(len(heads) * len(tails))
    ]
    topic = rng.permutation(np.arange(n) % num_topics)  # (n,) balanced topics, shuffled over ids
    level = rng.lognormal(0.0, 0.6, size=(num_topics, 3))  # price level of each (topic, category)
    width = max(5, len(str(n - 1)))
    seen_in_topic = [0] * num_topics
    rows = []
    for i, t in enumerate(topic.tolist()):
        spec, k = TOPICS[t], seen_in_topic[t]
        seen_in_topic[t] += 1
        category, nouns = list(spec.categories[service].items())[k % 3]  # categories in turn
        attrs = [spec.attributes[a] for a in rng.permutation(len(spec.attributes))[:3]]
        noun, size = nouns[rng.integers(len(nouns))], profile.sizes[rng.integers(len(profile.sizes))]
        brand = brands[t * BRANDS_PER_TOPIC + rng.integers(BRANDS_PER_TOPIC)]
        price = round(profile.price_median * level[t, k % 3] * rng.lognormal(0.0, 0.25), 2)
        title = f"{attrs[0][0].upper()}{attrs[0][1:]} {noun} {size}"
        text = f"{title} — brand {brand} — {category}, {attrs[1]}, {attrs[2]}"
        rows.append(
            (f"{profile.id_prefix}{i:0{width}d}", title, [spec.department, category], brand, price, text)
        )
    by_popularity = [rng.permutation(np.flatnonzero(topic == t)) for t in range(num_topics)]
    return rows, by_popularity


def build_catalogue(cfg: SyntheticConfig, services: tuple[str, ...]) -> Catalogue:
    """The catalogue of the configured services (each service's items depend only on seed and service)."""
    num_topics = cfg.num_topics
    made = {service: _service_items(cfg, service) for service in services}
    offset, rows, service_col = {}, [], []
    for service in sorted(services):  # catalogue order: (service, item_id), ids are zero-padded
        offset[service] = len(rows)
        rows.extend(made[service][0])
        service_col.extend([service] * len(made[service][0]))
    zipf = 1.0 / np.arange(1, cfg.items_per_service + 1) ** cfg.zipf_exponent
    seg_items, seg_cdf = [], []
    seg_end = np.zeros(len(SERVICES) * num_topics, dtype=np.int64)
    for service in services:  # segments in code order, so seg_cdf is sorted
        for t, members in enumerate(made[service][1]):
            seg = SERVICES.index(service) * num_topics + t
            cdf = np.cumsum(zipf[: len(members)]) / zipf[: len(members)].sum()
            cdf[-1] = 1.0
            seg_items.append(offset[service] + members)
            seg_cdf.append(seg + cdf)
            seg_end[seg:] = sum(len(s) for s in seg_items)
    columns = list(zip(*rows, strict=True))
    fields = list(ITEM_SCHEMA)[1:-1]  # item_id .. text: the text is composed, there is no item_text
    table = pa.Table.from_arrays(
        [pa.array(service_col, pa.string())]
        + [pa.array(col, field.type) for col, field in zip(columns, fields, strict=True)]
        + [pa.nulls(len(service_col), pa.string())],
        schema=ITEM_SCHEMA,
    )
    return Catalogue(
        table=table,
        item_ids=np.array(columns[0], dtype=object),
        price=np.array(columns[4], dtype=np.float32),
        seg_items=np.concatenate(seg_items),
        seg_cdf=np.concatenate(seg_cdf),
        num_topics=num_topics,
        seg_start=np.r_[0, seg_end[:-1]],
        seg_end=seg_end,
    )


# ---------------------------------------------------------------------------------------------
# Events of one block of users
# ---------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One block's events in output order: by user, service name, time. All arrays are (E,)."""

    user: np.ndarray  # user index
    service: np.ndarray  # service code (index in SERVICES)
    item: np.ndarray  # catalogue row
    timestamp: np.ndarray  # unix seconds
    quantity: np.ndarray
    group_start: np.ndarray  # (G + 1,) where each (user, service) history starts, then E


def _draw_items(cat: Catalogue, seg: np.ndarray, u: np.ndarray, how: str = "zipf") -> np.ndarray:
    """The catalogue row picked by ``u`` for each event's segment (a service's topic).

    ``how``: ``zipf`` by popularity inside the topic, ``topic`` uniformly inside it, ``service``
    uniformly over the segment's whole service (any topic).
    """
    if how == "zipf":
        pick = np.searchsorted(cat.seg_cdf, seg + u, side="right")
        return cat.seg_items[np.minimum(pick, cat.seg_end[seg] - 1)]  # u close to 1 can round up to seg + 1
    if how == "service":
        first = seg - seg % cat.num_topics
        start, end = cat.seg_start[first], cat.seg_end[first + cat.num_topics - 1]
    else:
        start, end = cat.seg_start[seg], cat.seg_end[seg]
    return cat.seg_items[np.minimum(start + np.floor(u * (end - start)).astype(np.int64), end - 1)]


def simulate_block(cfg: SyntheticConfig, cat: Catalogue, codes: np.ndarray, start: int, stop: int) -> Block:
    """Simulate users ``start..stop-1`` in the services ``codes`` (indices into SERVICES)."""
    n, num_topics, max_topics = stop - start, cfg.num_topics, min(cfg.max_topics_per_user, cfg.num_topics)
    keys = _user_keys(cfg.seed, np.arange(start, stop))  # (U,)
    users = np.arange(n)

    # services: how many, which (a weighted race without replacement), sampling weights among them
    u = _uniform(keys, Stream.NUM_SERVICES, 0)
    one = 1.0 - cfg.share_two_services - cfg.share_three_services
    num_services = np.minimum(1 + (u >= one) + (u >= one + cfg.share_two_services), len(codes))  # (U,)
    weight = np.array([PROFILES[SERVICES[c]].weight for c in codes])  # (C,)
    race = _exponential(_uniform(keys[:, None], Stream.SERVICE_RACE, np.arange(len(codes))), 1.0) / weight
    slot_order = np.argsort(race, axis=1)  # (U, C) the user's services, preferred first
    user_services = codes[slot_order]  # (U, C)
    slot_weight = np.where(np.arange(len(codes)) < num_services[:, None], weight[slot_order], 0.0)
    service_cum = np.cumsum(slot_weight, axis=1) / slot_weight.sum(axis=1, keepdims=True)  # (U, C)

    # taste: 1..max_topics topics (a race by topic popularity) with Dirichlet(1) weights
    popularity = 1.0 / np.arange(1, num_topics + 1) ** TOPIC_POPULARITY_EXPONENT
    popularity_cum = np.cumsum(popularity) / popularity.sum()
    num_tastes = 1 + np.floor(_uniform(keys, Stream.NUM_TOPICS, 0) * max_topics).astype(np.int64)  # (U,)
    race = _exponential(_uniform(keys[:, None], Stream.TOPIC_RACE, np.arange(num_topics)), 1.0) / popularity
    tastes = np.argsort(race, axis=1)[:, :max_topics]  # (U, K)
    taste_weight = _exponential(_uniform(keys[:, None], Stream.TOPIC_WEIGHT, np.arange(max_topics)), 1.0)
    taste_weight[np.arange(max_topics) >= num_tastes[:, None]] = 0.0
    taste_cum = np.cumsum(taste_weight, axis=1) / taste_weight.sum(axis=1, keepdims=True)  # (U, K)

    # sessions: at least one per active service (the first ones), the rest by service weight
    mean_sessions = cfg.mean_events_per_user / cfg.mean_events_per_session
    num_sessions = np.maximum(_geometric(_uniform(keys, Stream.NUM_SESSIONS, 0), mean_sessions), num_services)
    s_user = np.repeat(users, num_sessions)  # (S,)
    s_no = np.arange(len(s_user)) - (np.cumsum(num_sessions) - num_sessions)[s_user]  # session index in user
    s_keys = keys[s_user]
    slot = _pick(_uniform(s_keys, Stream.SESSION_SERVICE, s_no), service_cum[s_user], num_services[s_user])
    slot = np.where(s_no < num_services[s_user], s_no, slot)
    s_service = user_services[s_user, slot]  # (S,)
    s_size = _geometric(_uniform(s_keys, Stream.SESSION_SIZE, s_no), cfg.mean_events_per_session)
    u = _uniform(s_keys, Stream.SESSION_GAP, s_no)
    gap_s = np.where(
        s_no == 0, u * START_SPREAD_S, 3600.0 + _exponential(u, cfg.session_gap_hours * 3600 - 3600)
    )

    # events: minutes apart inside a session; timestamps are per-user cumulative sums of the gaps
    e_session = np.repeat(np.arange(len(s_user)), s_size)  # (E,)
    e_user = s_user[e_session]
    per_user = np.bincount(e_user, minlength=n)
    first = np.cumsum(per_user) - per_user  # (U,) first event of each user
    e_no = np.arange(len(e_user)) - first[e_user]  # event index in user: the counter of its draws
    e_keys = keys[e_user]
    opens_session = np.arange(len(e_user)) == (np.cumsum(s_size) - s_size)[e_session]
    within_s = 20.0 + _exponential(_uniform(e_keys, Stream.EVENT_GAP, e_no), 150.0)
    delta = np.where(opens_session, gap_s[e_session], within_s).astype(np.int64)
    total = np.cumsum(delta)
    timestamp = cfg.start_timestamp + total - (total[first] - delta[first])[e_user]
    e_service = s_service[e_session]

    # topic: from the user's taste, or off-taste from the global topic popularity
    u = _uniform(e_keys, Stream.TOPIC, e_no)
    topic = np.where(
        _uniform(e_keys, Stream.OFF_TASTE, e_no) < cfg.off_taste_prob,
        np.minimum(np.searchsorted(popularity_cum, u, side="right"), num_topics - 1),
        tastes[e_user, _pick(u, taste_cum[e_user], num_tastes[e_user])],
    )

    # group by (user, service name); stable, so each history stays chronological
    order = np.argsort(e_user * len(SERVICES) + SERVICE_ORDER[e_service], kind="stable")
    e_user, e_service, e_no, e_keys, topic, timestamp = (
        a[order] for a in (e_user, e_service, e_no, e_keys, topic, timestamp)
    )
    group = e_user * len(SERVICES) + e_service
    new_group = np.r_[True, group[1:] != group[:-1]]
    group_start = np.flatnonzero(new_group)
    g = np.cumsum(new_group) - 1  # (E,) history of each event
    j = np.arange(len(g)) - group_start[g]  # position in its history

    # new items: Zipf inside the topic, redrawn while the history already has them: the popular head
    # is what usually collides, so later redraws are uniform in the topic, the last ones in the
    # whole service (a long history that has bought its topic out looks elsewhere)
    repeat_prob = np.array([getattr(cfg, f"{s}_repeat_prob") for s in SERVICES])[e_service]
    repeat = (j > 0) & (_uniform(e_keys, Stream.REPEAT, e_no) < repeat_prob)
    fresh = np.flatnonzero(~repeat)
    seg = e_service * num_topics + topic
    item = np.zeros(len(g), dtype=np.int64)
    item[fresh] = _draw_items(cat, seg[fresh], _uniform(e_keys[fresh], Stream.ITEM, e_no[fresh]))
    for r in range(1, MAX_REDRAWS + 1):
        by_key = np.argsort(g[fresh] * len(cat.item_ids) + item[fresh], kind="stable")  # earliest first
        key = (g[fresh] * len(cat.item_ids) + item[fresh])[by_key]
        dup = fresh[by_key[1:][key[1:] == key[:-1]]]
        if len(dup) == 0:
            break
        how = "zipf" if r == 1 else "topic" if r <= MAX_REDRAWS // 2 else "service"
        item[dup] = _draw_items(cat, seg[dup], _uniform(e_keys[dup], Stream.ITEM + r, e_no[dup]), how)

    # repeats: a uniformly chosen earlier event of the history; follow chains of repeats to the source
    earlier = np.floor(_uniform(e_keys, Stream.REPEAT_PICK, e_no) * j).astype(np.int64)
    source = np.where(repeat, group_start[g] + earlier, np.arange(len(g)))
    while not np.array_equal(hop := source[source], source):
        source = hop
    item = item[source]

    mean_quantity = np.array([PROFILES[s].quantity_mean for s in SERVICES])[e_service]
    quantity = _geometric(_uniform(e_keys, Stream.QUANTITY, e_no), mean_quantity)
    return Block(
        user=e_user + start,
        service=e_service,
        item=item,
        timestamp=timestamp,
        quantity=quantity,
        group_start=np.r_[group_start, len(g)],
    )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: a block makes millions of tuples (no cycles) that each pass would walk."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def block_table(block: Block, cat: Catalogue, user_width: int, report: ReadReport) -> pa.Table:
    """Run every history of a block through ``order_and_split`` and return its EVENT_SCHEMA table.

    An event's ``where`` is its user key: nothing synthetic is rejected, so it only carries the user.
    """
    names = np.array(SERVICES, dtype=object)
    first = int(block.user[0])  # every user has events, so the block's users are first..last
    user_keys = np.array(
        [f"u{u:0{user_width}d}" for u in range(first, int(block.user[-1]) + 1)], dtype=object
    )
    rows = list(
        zip(
            names[block.service].tolist(),
            cat.item_ids[block.item].tolist(),
            block.timestamp.tolist(),
            [EVENT_TYPE] * len(block.item),
            block.quantity.astype(np.float64).tolist(),
            cat.price[block.item].tolist(),
            user_keys[block.user - first].tolist(),
            strict=True,
        )
    )
    report.rows_read += len(rows)
    out: list[tuple] = []
    bounds = block.group_start.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        out += order_and_split(rows[a:b], report)
    report.rows_kept += len(out)
    kept, position, split = zip(*out, strict=True)
    service, item_id, timestamp, event_type, quantity, price, user = zip(*kept, strict=True)
    columns = dict(
        user=user,
        service=service,
        item_id=item_id,
        timestamp=timestamp,
        position=position,
        split=split,
        event_type=event_type,
        quantity=quantity,
        price=price,
    )
    return pa.Table.from_arrays(
        [pa.array(columns[f.name], f.type) for f in EVENT_SCHEMA], schema=EVENT_SCHEMA
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def resolve_services(services: list[str] | None) -> tuple[str, ...]:
    """The configured services in SERVICES order (all when ``None``); unknown names are a DataError."""
    if services is None:
        return SERVICES
    unknown = sorted(set(services) - set(SERVICES))
    if unknown:
        raise DataError(f"unknown synthetic service(s) {unknown}; valid: {list(SERVICES)}")
    if not services:
        raise DataError(f"no services configured; valid: {list(SERVICES)}")
    return tuple(s for s in SERVICES if s in services)


def write(cfg: DataConfig, out_dir: Path) -> tuple[ReadReport, ReadReport]:
    """Generate and write ``<out_dir>/items/*.parquet`` and ``<out_dir>/events/part-XXXXX.parquet``.

    Events have EVENT_SCHEMA, whole users per shard (``users_per_shard`` of them), users sorted.

    Returns:
        ``(events_report, items_report)``.
    """
    sc = cfg.synthetic
    services = resolve_services(cfg.services)
    if sc.num_topics > len(TOPICS):
        raise ConfigError(
            f"synthetic.num_topics must be <= {len(TOPICS)} (the named topics), got {sc.num_topics}"
        )
    if sc.items_per_service < sc.num_topics:
        raise ConfigError(f"synthetic.items_per_service must be >= num_topics ({sc.num_topics})")
    out_dir = Path(out_dir)
    cat = build_catalogue(sc, services)
    items_report = ReadReport("synthetic", strict=cfg.strict)
    items_report.rows_read = items_report.rows_kept = cat.table.num_rows
    store.write_items(cat.table, out_dir)

    events_report = ReadReport("synthetic", strict=cfg.strict)
    codes = np.array([SERVICES.index(s) for s in services])
    user_width = max(6, len(str(sc.num_users - 1)))
    starts = range(0, sc.num_users, sc.users_per_shard)
    with progress() as bar:
        task = bar.add_task("synthetic users", total=sc.num_users)
        for shard, start in enumerate(starts):
            stop = min(start + sc.users_per_shard, sc.num_users)
            block = simulate_block(sc, cat, codes, start, stop)
            with _gc_paused():  # halves the time of block_table at 600k events per block
                table = block_table(block, cat, user_width, events_report)
            store.write_shard(table, out_dir / store.EVENTS_DIR / f"part-{shard:05d}.parquet")
            bar.advance(task, stop - start)
    return events_report, items_report
