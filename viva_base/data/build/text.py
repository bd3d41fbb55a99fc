"""Caption work of the paired-data pipeline: main objects, rewritten captions and instructions.

Two interchangeable back ends behind :class:`Language`:

* an LLM/VLM over the OpenAI-compatible chat API (:class:`~.models.ChatClient`), prompted with the
  ``PROMPTS`` below and answering JSON;
* rule-based fallbacks (no server): a lexicon of common object nouns in categories
  (:data:`LEXICON`), whole-word matching with plurals, same-category replacement, noun-phrase deletion
  and a table of global edits (:data:`GLOBAL_EDITS`). Crude but deterministic and offline.

Every answer says where it came from (``"source": "llm"`` or ``"rules"``) so records can show it.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

#: Common object nouns by category; replacements stay within a category (a dog becomes a cat, not a bus).
LEXICON: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "child", "person"),
    "animal": ("dog", "cat", "horse", "cow", "sheep", "bird", "duck", "bear", "elephant", "zebra", "giraffe", "lion",
               "tiger", "rabbit", "deer", "fox", "monkey", "goat", "pig", "chicken", "swan", "penguin"),
    "vehicle": ("car", "truck", "bus", "motorcycle", "bicycle", "boat", "train", "airplane", "van", "tractor",
                "scooter"),
    "object": ("ball", "cup", "bottle", "bag", "backpack", "umbrella", "hat", "book", "laptop", "phone", "chair",
               "bench", "table", "lamp", "vase", "clock", "guitar", "kite", "skateboard", "surfboard", "teddy bear",
               "suitcase", "box", "basket"),
    "food": ("apple", "banana", "orange", "cake", "pizza", "sandwich", "donut", "carrot", "broccoli"),
    "plant": ("tree", "flower", "bush", "plant", "cactus"),
}
CATEGORY = {noun: cat for cat, nouns in LEXICON.items() for noun in nouns}
IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "person": "people", "sheep": "sheep",
                     "deer": "deer", "fish": "fish", "mouse": "mice", "goose": "geese"}


def plural(noun: str) -> str:
    """English plural of a lexicon noun (irregulars, ``-ies``, ``-es``, else ``-s``; last word of a compound)."""
    *head, last = noun.split(" ")
    if last in IRREGULAR_PLURALS:
        p = IRREGULAR_PLURALS[last]
    elif re.search(r"[^aeiou]y$", last):
        p = last[:-1] + "ies"
    elif re.search(r"(s|x|z|ch|sh)$", last) or last in ("tomato", "potato"):
        p = last + "es"
    else:
        p = last + "s"
    return " ".join(head + [p])


def article(word: str) -> str:
    """``an`` before a vowel sound (by spelling), else ``a``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _noun_pattern(noun: str) -> re.Pattern:
    forms = sorted({noun, plural(noun)}, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(f) for f in forms) + r")\b", re.IGNORECASE)


def find_objects(caption: str, max_objects: int = 3) -> list[str]:
    """Lexicon nouns named in ``caption`` (singular or plural, whole words), in order of first mention,
    at most ``max_objects``. Longer names win where they overlap (``teddy bear`` over ``bear``)."""
    hits: list[tuple[int, int, str]] = []
    for noun in sorted(CATEGORY, key=len, reverse=True):
        for m in _noun_pattern(noun).finditer(caption):
            if not any(s < m.end() and m.start() < e for s, e, _ in hits):
                hits.append((m.start(), m.end(), noun))
    seen: list[str] = []
    for _, _, noun in sorted(hits):
        if noun not in seen:
            seen.append(noun)
    return seen[:max_objects]


def choose_replacement(noun: str, rng: random.Random) -> str:
    """Another noun of the same lexicon category (or of the ``object`` category for unknown nouns)."""
    pool = [n for n in LEXICON.get(CATEGORY.get(noun, "object"), LEXICON["object"]) if n != noun]
    return rng.choice(pool)


def replace_object(caption: str, old: str, new: str) -> str:
    """``caption`` with every mention of ``old`` replaced by ``new`` (plural stays plural) and the article
    before a singular mention fixed (``a apple`` cannot happen)."""
    old_plural = plural(old)

    def sub(m: re.Match) -> str:
        word = m.group(0)
        rep = plural(new) if word.lower() == old_plural and old_plural != old else new
        return rep.capitalize() if word[:1].isupper() else rep

    out = _noun_pattern(old).sub(sub, caption)
    # fix "a"/"an" right before the replaced noun (possibly with adjectives between: keep it simple, adjacent only)
    return re.sub(r"\b(a|an|A|An)\s+(" + re.escape(new) + r")\b",
                  lambda m: (article(m.group(2)).capitalize() if m.group(1)[0].isupper() else article(m.group(2)))
                  + " " + m.group(2), out)


_DETERMINERS = r"(?:a|an|the|one|two|three|some|several|his|her|their|its|this|that)"
_ADJECTIVES = (r"(?:small|little|tiny|large|big|huge|tall|short|young|old|white|black|brown|grey|gray|red|green|blue|"
               r"yellow|orange|pink|purple|golden|dark|light|wooden|metal|plastic|cute|fluffy|shiny|striped|spotted)")


def remove_object(caption: str, noun: str) -> str:
    """``caption`` without the noun phrases of ``noun`` (determiner, up to two common adjectives, the noun) and
    the conjunction that joined them; falls back to "the scene" when nothing is left."""
    forms = "|".join(re.escape(f) for f in sorted({noun, plural(noun)}, key=len, reverse=True))
    phrase = rf"(?:\b{_DETERMINERS}\s+)?(?:{_ADJECTIVES}\s+){{0,2}}\b(?:{forms})\b"
    out = re.sub(rf"\s*(?:,\s*)?\b(?:and|with|next to|beside)\s+{phrase}", "", caption, flags=re.IGNORECASE)
    out = re.sub(rf"{phrase}\s*(?:,\s*)?(?:\band\b\s+)?", "", out, count=0, flags=re.IGNORECASE)
    out = re.sub(r"\s{2,}", " ", out).strip(" ,;")
    out = re.sub(r"^(?:and|with)\s+", "", out, flags=re.IGNORECASE)
    if not out or not re.search(r"[A-Za-z]{3,}", out):
        return "the scene"
    return out[0].upper() + out[1:]


@dataclass(frozen=True)
class GlobalEdit:
    """One global content edit: how the caption changes and the instructions of both directions."""

    name: str
    caption_suffix: str
    forward: str      # real -> synthesised
    backward: str     # synthesised -> real
    negative: str


GLOBAL_EDITS: dict[str, GlobalEdit] = {e.name: e for e in (
    GlobalEdit("night", "at night, under a dark sky with artificial lights", "make it night",
               "make it daytime", "daylight, sunny, bright sky"),
    GlobalEdit("sunset", "at sunset, in warm orange evening light", "change the time of day to sunset",
               "change the lighting back to plain daylight", "midday, blue sky"),
    GlobalEdit("winter", "in winter, everything covered in snow", "make it winter with snow everywhere",
               "remove the snow and make it a mild season", "green grass, summer"),
    GlobalEdit("autumn", "in autumn, with orange and red leaves", "make it autumn",
               "make the foliage green as in summer", "green leaves, spring"),
    GlobalEdit("rain", "in heavy rain, with wet reflective surfaces", "make it rain heavily",
               "stop the rain and make the weather dry and clear", "dry, sunny"),
    GlobalEdit("fog", "in thick fog", "add thick fog to the scene", "remove the fog", "clear air, sharp"),
)}


def global_caption(caption: str, edit: GlobalEdit) -> str:
    """The caption with the global edit appended (rule-based)."""
    return f"{caption.rstrip(' .')}, {edit.caption_suffix}."


# ---------------------------------------------------------------------------------------------- prompts
PROMPTS = {
    "objects": (
        "TASK: objects\nList the main physical objects named in this video caption that could be segmented in the "
        "video (people, animals, vehicles, things; not the background, not places), most important first, at most "
        "{k}, each as a short singular noun.\nCaption: \"{caption}\"\n"
        "Answer with a JSON object only: {{\"objects\": [\"...\"]}}"),
    "replace": (
        "TASK: replace\nChoose a different object to take the place of the {obj} in this video caption: of similar "
        "size, plausible in the scene, visibly different. Rewrite the caption with it, changing nothing else.\n"
        "Caption: \"{caption}\"\nAnswer with a JSON object only: {{\"new_object\": \"...\", \"caption\": \"...\"}}"),
    "remove": (
        "TASK: remove\nRewrite this video caption as if the {obj} were not in the video at all, changing nothing "
        "else.\nCaption: \"{caption}\"\nAnswer with a JSON object only: {{\"caption\": \"...\"}}"),
    "global": (
        "TASK: global\nRewrite this video caption so the whole scene shows this change: {change}. Keep the objects, "
        "layout and motion.\nCaption: \"{caption}\"\nAnswer with a JSON object only: {{\"caption\": \"...\"}}"),
    "filter": (
        "TASK: filter\nYou see frames of VIDEO A (real) and the frames at the same times of VIDEO B (synthesised "
        "from A by a {kind} edit: {hint}).\n"
        "1. artifacts: does VIDEO B show generation artifacts (blur, distortions, smears, flicker, broken "
        "objects, unnatural textures)? true or false.\n"
        "2. edit_applied: does B really differ from A by that edit (and not by much else)? true or false.\n"
        "3. a_to_b: a short imperative editing instruction that turns A into B.\n"
        "4. b_to_a: a short imperative editing instruction that turns B into A.\n"
        "Answer with a JSON object only: {{\"artifacts\": true, \"edit_applied\": true, \"a_to_b\": \"...\", "
        "\"b_to_a\": \"...\"}}"),
}


def _clean(text) -> str:
    return re.sub(r"\s+", " ", str(text or "")).strip().strip('"').strip()


class Language:
    """Caption operations through an LLM (``client``, a :class:`~.models.ChatClient`) or the rules."""

    def __init__(self, client=None):
        self.client = client

    @property
    def source(self) -> str:
        return "llm" if self.client is not None else "rules"

    def objects(self, caption: str, max_objects: int = 3) -> list[str]:
        """The main objects of the caption, most important first."""
        if self.client is None:
            return find_objects(caption, max_objects)
        ans = self.client.chat_json(PROMPTS["objects"].format(k=max_objects, caption=caption), ["objects"])
        objs = ans["objects"] if isinstance(ans["objects"], list) else []
        out = []
        for o in objs:
            o = _clean(o).lower()
            if o and o not in out:
                out.append(o)
        return out[:max_objects]

    def replacement(self, caption: str, obj: str, rng: random.Random) -> tuple[str, str]:
        """``(new_object, rewritten caption)``."""
        if self.client is None:
            new = choose_replacement(obj, rng)
            return new, replace_object(caption, obj, new)
        ans = self.client.chat_json(PROMPTS["replace"].format(obj=obj, caption=caption), ["new_object", "caption"])
        new, text = _clean(ans["new_object"]).lower(), _clean(ans["caption"])
        if not new or not text:
            raise ValueError(f"the LLM gave an empty replacement for {obj!r}: {ans}")
        return new, text

    def without(self, caption: str, obj: str) -> str:
        """The caption as if ``obj`` were absent."""
        if self.client is None:
            return remove_object(caption, obj)
        text = _clean(self.client.chat_json(PROMPTS["remove"].format(obj=obj, caption=caption), ["caption"])["caption"])
        return text or remove_object(caption, obj)

    def global_rewrite(self, caption: str, edit: GlobalEdit) -> str:
        """The caption with a global change (time of day, season, weather)."""
        if self.client is None:
            return global_caption(caption, edit)
        change = f"{edit.name} ({edit.caption_suffix})"
        text = _clean(self.client.chat_json(PROMPTS["global"].format(change=change, caption=caption), ["caption"])["caption"])
        return text or global_caption(caption, edit)


def rule_instructions(kind: str, info: dict) -> tuple[str, str]:
    """Template instructions ``(real -> synthesised, synthesised -> real)`` for a candidate pair."""
    if kind == "replace":
        old, new = info["object"], info["new_object"]
        return f"replace the {old} with {article(new)} {new}", f"replace the {new} with {article(old)} {old}"
    if kind == "remove":
        obj = info["object"]
        return f"remove the {obj}", f"add {article(obj)} {obj}"
    if kind == "global":
        edit = GLOBAL_EDITS[info["edit"]]
        return edit.forward, edit.backward
    raise ValueError(f"unknown candidate kind {kind!r}")


def filter_hint(kind: str, info: dict) -> str:
    """What the synthesised video is meant to show, for the filter prompt."""
    if kind == "replace":
        return f"the {info['object']} replaced by {article(info['new_object'])} {info['new_object']}"
    if kind == "remove":
        return f"the {info['object']} removed"
    if kind == "global":
        return f"the whole scene changed to {info['edit']}"
    raise ValueError(f"unknown candidate kind {kind!r}")


def filter_prompt(kind: str, info: dict) -> str:
    return PROMPTS["filter"].format(kind=kind, hint=filter_hint(kind, info))


def seeded_rng(*parts) -> random.Random:
    """A :class:`random.Random` seeded from a stable hash of ``parts`` (seed, record id, stage)."""
    from .records import stable_hash

    return random.Random(stable_hash(*parts))
