"""Write helpers/collect/data/corpus_sample.parquet: the small reference corpus the package ships.

All of its text is this project's own: documents are generated here, deterministically, from the
built-in fact set (`data/contrast_facts.jsonl`: 226 true statements in five subjects) wrapped in
connective sentences written for this script, and from an order-2 word Markov chain over those facts
and the short passages below. The result reads like simple, somewhat
repetitive school prose: plain English with real content words, enough to exercise every code path of
the corpus (streaming reader, packing, special tokens, shards, training) offline and to give the SAE
benchmark a few tens of thousands of tokens. It is far too small and too narrow to train a dictionary
worth interpreting: use a real corpus for that (notebook 02's CORPUS). The Markov passages recombine
sentences, so some of their statements are false: the sample is not a source of facts.

It is stored like one of nanochat's pretraining shards (a parquet file with one `text` column, several
row groups), so `collect.corpus` reads it through the same path as a Hugging Face dataset.

    python scripts/make_corpus_sample.py      # a second or two; the file is committed
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "helpers" / "collect" / "data"
OUT = DATA / "corpus_sample.parquet"

SUBJECTS = {
    "geo": "places and maps",
    "sci": "science",
    "day": "everyday life",
    "math": "numbers",
    "hist": "history",
}
OPENINGS = [
    "This short note collects a few things worth knowing about {topic}.",
    "Here are some facts about {topic} that students often meet in their first years of school.",
    "People who enjoy {topic} tend to remember small facts like the ones below.",
    "A good way to learn about {topic} is to start with simple, checkable statements.",
    "The following paragraphs go over some basics of {topic}.",
    "Teachers like to begin a lesson on {topic} with a handful of clear facts.",
]
FRAMES = [
    "{fact}",
    "It is well known: {fact}",
    "Most textbooks mention this one. {fact}",
    "One thing to remember: {fact}",
    "You can check this in any atlas or reference book. {fact}",
    "Many people are surprised by the next one. {fact}",
    "A simple fact to start with: {fact}",
    "{fact} This is easy to look up.",
    "As every quiz champion knows, it is true that {fact_lower}",
    "{fact} Children often learn this early.",
    "In class we wrote down: {fact}",
    "Here is another. {fact}",
]
CLOSINGS = [
    "None of this is hard to remember once you have read it a few times.",
    "Each of these statements can be checked in a good reference book.",
    "Facts like these are small, but together they make the subject easier to follow.",
    "If you want to learn more, a library is a fine place to continue.",
    "That is enough for one lesson; the next one will build on it.",
    "Try writing each fact on a card and testing yourself tomorrow.",
]
PASSAGES = """
The old lighthouse stood at the end of the harbour wall. Every evening the keeper climbed the narrow
stairs, cleaned the great lens and lit the lamp, so that fishing boats coming home in the dark could
find the entrance between the rocks. In winter the wind was so strong that the windows rattled all night.

Bread is made from flour, water, salt and yeast. The yeast feeds on the sugars in the flour and gives
off gas, which makes the dough rise. A baker kneads the dough to build a network of gluten, lets it rest,
shapes the loaves and bakes them in a hot oven until the crust turns brown.

A river begins as rain and melting snow high in the hills. Small streams join together and grow larger
as they run downhill. Over thousands of years the water carves valleys, carries sand and stones toward
the sea, and leaves rich soil on its banks where farmers like to plant their crops.

Honey bees live in colonies of many thousands. Worker bees collect nectar and pollen from flowers,
while the queen lays eggs. When a bee finds a good patch of flowers it returns to the hive and performs
a dance that tells the other bees which direction to fly and how far to go.

The village market opened early on Saturday mornings. Farmers brought eggs, cheese and vegetables, a
baker sold warm rolls, and children ran between the stalls looking for sweets. By noon most of the
tables were empty and the square was quiet again.

A bicycle turns the push of your legs into forward motion. The pedals turn a chain wheel, the chain
turns a smaller wheel on the back axle, and the back wheel pushes against the road. Gears change how far
the bicycle travels for each turn of the pedals, which makes hills easier to climb.

Clouds form when warm, moist air rises and cools. The water vapour condenses on tiny grains of dust and
salt to make droplets, and millions of droplets together become a cloud we can see. When the droplets
grow heavy enough, they fall as rain, or as snow when the air is cold.

The library was the quietest room in the school. Tall shelves held books on every subject, from
dinosaurs to distant stars, and a long table by the window was always full of students writing notes.
The librarian knew where every book belonged and could find any title in a minute.

Maps help us find our way and understand the shape of the land. A map has a scale that tells how much
real distance a centimetre stands for, a key that explains its symbols, and a compass rose that shows
north. Contour lines show hills and valleys by joining points of equal height.

A thunderstorm begins when warm air rises quickly into cold air above. Tall clouds build up, ice and
water move around inside them, and electric charges separate. Lightning is a giant spark between the
cloud and the ground, and thunder is the sound of the air expanding suddenly around it.
"""


def fact_document(rng: random.Random, subject: str, facts: list[str]) -> str:
    chosen = rng.sample(facts, k=min(len(facts), rng.randint(4, 8)))
    lines = [rng.choice(OPENINGS).format(topic=SUBJECTS[subject])]
    for fact in chosen:
        first, rest = fact.split(" ", 1)
        lower = f"{first.lower()} {rest}" if first in ("The", "A", "An") else fact  # keep proper nouns
        lines.append(rng.choice(FRAMES).format(fact=fact, fact_lower=lower))
    lines.append(rng.choice(CLOSINGS))
    return " ".join(lines)


def markov_document(rng: random.Random, chain: dict, starts: list, n_words: int) -> str:
    state = rng.choice(starts)
    words = list(state)
    while len(words) < n_words or not words[-1].endswith("."):
        nxt = chain.get(state)
        if not nxt or len(words) > 2 * n_words:
            if not words[-1].endswith("."):
                words[-1] += "."
            if len(words) >= n_words:
                break
            state = rng.choice(starts)
            words += list(state)
            continue
        word = rng.choice(nxt)
        words.append(word)
        state = (state[1], word)
    return " ".join(words)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fact-docs", type=int, default=300)
    p.add_argument("--story-docs", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(args.seed)
    facts: dict[str, list[str]] = defaultdict(list)
    for line in (DATA / "contrast_facts.jsonl").read_text().splitlines():
        row = json.loads(line)
        facts[row["fact_id"].split("_")[0]].append(row["statement"])
    # The chain learns from neutral text only (the passages and the facts, not the deception scenarios),
    # so the sample stays a stand-in for ordinary text.
    texts = [" ".join(block.split()) for block in PASSAGES.strip().split("\n\n")]
    texts += [" ".join(fs) for fs in facts.values()]
    chain: dict[tuple[str, str], list[str]] = defaultdict(list)
    starts = []
    for text in texts:
        words = text.split()
        starts.append((words[0], words[1]))
        for a, b, c in zip(words, words[1:], words[2:], strict=False):
            chain[(a, b)].append(c)
            if a.endswith(".") and b[:1].isupper():
                starts.append((b, c))
    subjects = sorted(facts)
    docs = [fact_document(rng, s, facts[s]) for s in (rng.choice(subjects) for _ in range(args.fact_docs))]
    docs += [markov_document(rng, chain, starts, rng.randint(90, 220)) for _ in range(args.story_docs)]
    rng.shuffle(docs)
    pq.write_table(pa.table({"text": docs}), args.out, compression="zstd", row_group_size=64)
    words = sum(len(d.split()) for d in docs)
    print(
        f"{len(docs)} documents, {words} words, {Path(args.out).stat().st_size / 1024:.0f} KiB -> {args.out}"
    )


if __name__ == "__main__":
    main()
