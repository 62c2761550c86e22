"""Build the extra router training data (`extra_train.jsonl`, `conversations.jsonl`) from public repos.

Why: the router generalises badly to unseen sources (issue 15): multiple-choice (MC) format predicts
`general`, figures predict `math`, short conceptual questions fall into `general`. These rows add
new, permissively licensed query sources in many formats per label so no format predicts a label.
Every source, licence and transformation is documented in README.md next to this file.

Inputs are bare git snapshots under a mirror folder (one `owner+name/repo` git dir per repository, as
brought by the session's fetch tool); each file is read with `git show COMMIT:PATH` at the commit pinned
in `REPOS`, so a rerun gives the same rows (except ~5 % of the generated mathematics_dataset rows, whose
generator orders some objects by identity). Nothing here is imported by gateway code.

Rerun (from the repo root; the mirror needs the repositories listed in `REPOS`):

    python -m venv /tmp/mdsenv
    /tmp/mdsenv/bin/pip install six absl-py "sympy==1.5.1" "numpy<1.24" openpyxl
    /tmp/mdsenv/bin/python router_model/data/build_extra.py --mirror /work/.mirror \
        --shared /work/shared/data/routing --out router_model/data

The separate interpreter is needed by the deepmind/mathematics_dataset generator (an old sympy and numpy)
and by the LEXam spreadsheets (openpyxl); without those packages the two sources are skipped with a
warning on stderr. The script re-executes itself with PYTHONHASHSEED=0, then runs
`shared/tools/contamination.py` on both outputs and removes every MATCH and NEAR row (conservative).
Outputs: `extra_train.jsonl` rows `{id, text, label, source, license}`; `conversations.jsonl` rows
`{id, messages, label, source, license, kind}` whose last message is a user turn.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import html
import importlib
import importlib.util
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

MAX_CHARS = 1500
MC_LETTERS = "ABCDEFGH"

# repo -> pinned commit (the snapshot the rows were built from)
REPOS: dict[str, str] = {
    "openstax/osbooks-principles-economics-bundle": "cd31beb103fffbc09cc81ebfe117d8c40cc12d1a",
    "openstax/osbooks-introduction-python-programming": "d6d069bb24677a375aa28a574bd506d4b893cfdf",
    "h5bp/Front-end-Developer-Interview-Questions": "c8023cdcc4e13d45c096c3f37160a8fa5ab066d6",
    "trimstray/test-your-sysadmin-skills": "d566322e4f6a656fb835bf34712a67db269d5f2d",
    "alexeygrigorev/data-science-interviews": "83a2fefb2f0cef229c0b96a729e8ce73e540ddc8",
    "ruixiangcui/AGIEval": "5c77d073fda993f1652eaae3cf5d04cc5fd21d40",
    "pubmedqa/pubmedqa": "1cbae8e92f72f20c8d3747cbb3bf5bc53554d997",
    "wasiahmad/PolicyQA": "775538bc6d932e9d0dd16975d4373659cf8964fe",
    "deepmind/mathematics_dataset": "e91dba649b843597c14b9d84dfe92bff79b7d299",
    "eth-nlped/mathdial": "b452be46f28b1e64cfe2646302e3ca8c502926d0",
    "openai/grade-school-math": "3101c7d5072418e28b9008a6636bde82a006892c",
    "LEXam-Benchmark/LEXam": "487f729e85725e5d3e00c0b25142de1e86cda643",
    "google-research-datasets/dstc8-schema-guided-dialogue": "e852981ae34990f4358979625854259302feaa78",
    "lydiahallie/javascript-questions": "a8b427b9f7f94f1a2965144ba544b475c5f65829",
    "exercism/problem-specifications": "03f83310ed0547b902d211a05d23b3d74661df02",
    "karan/Projects": "10ed1c05166c66aa1b1085b92d95b67ad5268182",
    "donnemartin/interactive-coding-challenges": "358f2cc60426d5c4c3d7d580910eec9a7b393fa9",
    "jkkummerfeld/irc-disentanglement": "82ed04f9627a45d0d6f2ec3c8683c88eb408a0d5",
    "30-seconds/30-seconds-of-interviews": "eb703b6a5afbec694014266e3b11230cfd1f3aa9",
}

# Dropped from rows labelled `general` (same spirit as the shared dataset's DOMAIN_RE): a hit means
# the item may belong to another expert, so it is left out rather than relabelled.
GENERAL_DROP_RE = re.compile(
    r"\b(law|laws|legal|court|courts|judge|statute|contract|lawsuit|attorney|lawyer|plaintiff|defendant|"
    r"tenant|landlord|constitution\w*|legislat\w*|regulation|liable|liability|crime|criminal|"
    r"tax|taxes|stock|stocks|bond|bonds|invest\w*|bank|banks|banking|loan|loans|mortgage|interest rate|"
    r"dividend|profit|revenue|accounting|finance|financial|price|prices|economy|economic\w*|"
    r"program|programming|software|computer|algorithm|code|coding|database|"
    r"equation|integral|derivative|probability|percent|percentage)\b",
    re.I,
)


@dataclass(frozen=True)
class Row:
    """One single-turn training row; `source` is `family/subset` (family = leave-one-out unit)."""

    text: str
    label: str
    source: str
    license: str

    def to_json(self) -> dict[str, str]:
        digest = hashlib.sha1(f"{self.source}\n{self.text}".encode()).hexdigest()[:12]
        return {"id": f"ex-{digest}", "text": self.text, "label": self.label, "source": self.source,
                "license": self.license}


@dataclass(frozen=True)
class Conversation:
    """One multi-turn row; `messages` ends with a user turn, `label` is the expert for that turn."""

    messages: tuple[tuple[str, str], ...]
    label: str
    source: str
    license: str
    kind: str

    def to_json(self) -> dict[str, object]:
        body = json.dumps(self.messages)
        digest = hashlib.sha1(f"{self.source}\n{body}".encode()).hexdigest()[:12]
        return {"id": f"cv-{digest}", "messages": [{"role": r, "content": c} for r, c in self.messages],
                "label": self.label, "source": self.source, "license": self.license, "kind": self.kind}


class Mirror:
    """Reads files of pinned commits from bare git snapshots under `root/owner+name/repo`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def git_dir(self, repo: str) -> Path:
        base = self.root / repo.replace("/", "+") / "repo"
        return base / ".git" if (base / ".git").is_dir() else base

    def show(self, repo: str, path: str) -> str:
        out = subprocess.run(["git", "--git-dir", str(self.git_dir(repo)), "show", f"{REPOS[repo]}:{path}"],
                             check=True, capture_output=True)
        return out.stdout.decode("utf-8")

    def ls(self, repo: str) -> list[str]:
        out = subprocess.run(["git", "--git-dir", str(self.git_dir(repo)), "ls-tree", "-r", "--name-only",
                              REPOS[repo]], check=True, capture_output=True, text=True)
        return out.stdout.splitlines()

    def export(self, repo: str, dest: Path) -> None:
        """Writes the pinned tree of `repo` into `dest` (for code that must be imported)."""
        archive = subprocess.run(["git", "--git-dir", str(self.git_dir(repo)), "archive", REPOS[repo]],
                                 check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def clean(text: str, keep_indent: bool = False) -> str:
    """HTML-unescapes and collapses runs of spaces (newlines between paragraphs are kept).

    With `keep_indent` (text with code), leading spaces of lines are kept and only trailing ones removed.
    """
    text = html.unescape(text).replace("\u00a0", " ").replace("\r", "")
    if keep_indent:
        text = re.sub(r"[ \t]+\n", "\n", text)
        return re.sub(r"\n{3,}", "\n\n", text).strip()
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def cap(text: str, limit: int = MAX_CHARS) -> str:
    """Cuts `text` to at most `limit` characters at a word boundary, appending '…' when cut."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


def with_context(context: str, tail: str, limit: int = MAX_CHARS) -> str:
    """`context` (capped) + blank line + `tail`, fitting `limit` characters; `tail` is never cut."""
    room = limit - len(tail) - 2
    if room < 200:
        return cap(tail, limit)
    return cap(context, room) + "\n\n" + tail


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

ECON_REPO = "openstax/osbooks-principles-economics-bundle"
# Financial markets + the macroeconomics chapters (the shared dataset maps MMLU macroeconomics to finance;
# microeconomics and trade-policy chapters are left out as ambiguous, as there).
ECON_FINANCE_CHAPTERS = {
    "Financial Markets", "The Macroeconomic Perspective", "Economic Growth", "Unemployment", "Inflation",
    "The International Trade and Capital Flows", "The Aggregate Demand/Aggregate Supply Model",
    "The Keynesian Perspective", "The Neoclassical Perspective", "Money and Banking",
    "Monetary Policy and Bank Regulation", "Exchange Rates and International Capital Flows",
    "Government Budgets and Fiscal Policy", "The Impacts of Government Borrowing",
    "Macroeconomic Policy Around the World",
}
ECON_SECTIONS = {"self-check-questions", "review-questions", "critical-thinking", "problems"}
CNX = "{http://cnx.rice.edu/cnxml}"
COL = "{http://cnx.rice.edu/collxml}"
MD = "{http://cnx.rice.edu/mdml}"
FIGURE_REF_RE = re.compile(r"\b(Table|Figure|Exercise)\s+\d", re.I)


def _cnx_text(elem: ET.Element) -> str:
    """Plain text of a CNXML element: paragraphs and list items on their own lines, MathML inline."""
    parts: list[str] = []

    def walk(e: ET.Element) -> None:
        tag = e.tag.split("}")[-1]
        if tag == "row":  # table rows as "a | b | c" lines
            cells = [clean(" ".join(c.itertext())) for c in e if c.tag.split("}")[-1] == "entry"]
            parts.append("\n" + " | ".join(cells) + "\n")
            if e.tail:
                parts.append(e.tail)
            return
        block = tag in {"para", "item", "list", "equation", "table", "title"}
        if block:
            parts.append("\n")
        if tag == "item":
            parts.append("- ")
        if e.text:
            parts.append(e.text)
        for child in e:
            walk(child)
            if child.tail:
                parts.append(child.tail)
        if block:
            parts.append("\n")

    walk(elem)
    return clean("".join(parts))


def openstax_economics(mirror: Mirror) -> list[Row]:
    """Finance-chapter exercises of OpenStax Principles of Economics 3e (CC-BY-4.0) → finance."""
    col = ET.fromstring(mirror.show(ECON_REPO, "collections/principles-economics-3e.collection.xml"))
    rows: list[Row] = []
    for sub in col.iter(f"{COL}subcollection"):
        title = sub.findtext(f"{MD}title") or ""
        if title not in ECON_FINANCE_CHAPTERS:
            continue
        for module in sub.iter(f"{COL}module"):
            doc = ET.fromstring(mirror.show(ECON_REPO, f"modules/{module.get('document')}/index.cnxml"))
            for section in doc.iter(f"{CNX}section"):
                kind = section.get("class") or ""
                if kind not in ECON_SECTIONS:
                    continue
                for problem in section.iter(f"{CNX}problem"):
                    if any(problem.iter(f"{CNX}media")) or any(problem.iter(f"{CNX}figure")):
                        continue
                    text = _cnx_text(problem)
                    has_table = any(problem.iter(f"{CNX}table"))
                    if len(text) < 25 or (FIGURE_REF_RE.search(text) and not has_table):
                        continue
                    rows.append(Row(cap(text), "finance", f"openstax_econ/{kind}", "CC-BY-4.0"))
    return rows


GLOSSARY_QUESTIONS = ("What is {a} {t}?", "What does \"{t}\" mean?", "Explain {t}.", "{T}: what is it?",
                      "Can you define {t}?")


def openstax_econ_glossary(mirror: Mirror, rng: random.Random) -> list[Row]:
    """Key terms of the same finance chapters (CC-BY-4.0) → short conceptual questions and term MC.

    Each term becomes one question in one of five fixed wordings ("What is a bond?"); every other term
    also becomes an MC item: its definition, "Which term does this describe?" and four of the chapter's
    terms as options `A)`–`D)` (three others from the same glossary as distractors).
    """
    col = ET.fromstring(mirror.show(ECON_REPO, "collections/principles-economics-3e.collection.xml"))
    by_chapter: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for sub in col.iter(f"{COL}subcollection"):
        title = sub.findtext(f"{MD}title") or ""
        if title not in ECON_FINANCE_CHAPTERS:
            continue
        for module in sub.iter(f"{COL}module"):
            doc = ET.fromstring(mirror.show(ECON_REPO, f"modules/{module.get('document')}/index.cnxml"))
            for d in doc.iter(f"{CNX}definition"):
                term_el = d.find(f"{CNX}term")
                term = clean(" ".join(term_el.itertext())) if term_el is not None else ""
                meaning_el = d.find(f"{CNX}meaning")
                if term and meaning_el is not None:
                    by_chapter[title].append((term, clean(" ".join(meaning_el.itertext()))))
    rows: list[Row] = []
    for chapter in sorted(by_chapter):
        terms = sorted(set(by_chapter[chapter]))
        for i, (term, meaning) in enumerate(terms):
            wording = GLOSSARY_QUESTIONS[rng.randrange(len(GLOSSARY_QUESTIONS))]
            article = "an" if term[:1].lower() in "aeiou" else "a"
            q = wording.format(a=article, t=term, T=term[:1].upper() + term[1:])
            rows.append(Row(q, "finance", "openstax_econ_terms/question", "CC-BY-4.0"))
            if i % 2 or len(terms) < 4:
                continue
            others = rng.sample([t for t, _ in terms if t != term], 3)
            options = [*others, term]
            rng.shuffle(options)
            opts = "\n".join(f"{MC_LETTERS[j]}) {o}" for j, o in enumerate(options))
            text = f"{meaning[:1].upper() + meaning[1:]}\n\nWhich term does this describe?\n{opts}"
            rows.append(Row(text, "finance", "openstax_econ_terms/mc", "CC-BY-4.0"))
    return rows


PY_REPO = "openstax/osbooks-introduction-python-programming"


def openstax_python(mirror: Mirror) -> list[Row]:
    """'Practice program' / 'Try it' task statements of OpenStax Intro to Python (CC-BY-4.0) → code."""
    rows: list[Row] = []
    for path in mirror.ls(PY_REPO):
        if not (path.startswith("modules/") and path.endswith(".cnxml")):
            continue
        doc = ET.fromstring(mirror.show(PY_REPO, path))
        for note in doc.iter(f"{CNX}note"):
            if (note.get("class") or "") not in {"practice-program", "try-it", "cube-practice"}:
                continue
            title = note.findtext(f"{CNX}title") or ""
            paras = [p for p in note if p.tag in {f"{CNX}para", f"{CNX}list", f"{CNX}code"}]
            body = "\n".join(_cnx_text(p) if p.tag != f"{CNX}code" else (p.text or "").strip("\n")
                             for p in paras)
            body = clean(body, keep_indent=True)
            if len(body) < 40 or "os-embed" in body:
                continue
            text = f"{title}\n{body}" if title and title.lower() not in body[:80].lower() else body
            rows.append(Row(cap(text), "code", "openstax_python/practice", "CC-BY-4.0"))
    return rows


H5BP_REPO = "h5bp/Front-end-Developer-Interview-Questions"
H5BP_FILES = ["coding", "css", "html", "javascript", "network", "performance", "testing"]


def h5bp_questions(mirror: Mirror) -> list[Row]:
    """Front-end interview questions (MIT) → code: short conceptual questions ('Explain hoisting')."""
    rows: list[Row] = []
    for name in H5BP_FILES:
        text = mirror.show(H5BP_REPO, f"src/questions/{name}-questions.md")
        for line in text.splitlines():
            m = re.match(r"^(\s*)\*\s+(.+)$", line)
            if not m:
                continue
            q = clean(m.group(2))
            nested = bool(m.group(1))
            if nested and not q.endswith("?"):
                continue  # sub-bullets are follow-ups or bare term lists ("Do Not Track")
            if len(q.split()) >= 4 and "```" not in q:
                rows.append(Row(q, "code", f"h5bp_frontend/{name}", "MIT"))
    return rows


SYSADMIN_REPO = "trimstray/test-your-sysadmin-skills"


def sysadmin_questions(mirror: Mirror) -> list[Row]:
    """Linux/network/DevOps interview questions (MIT) → code (systems/software questions)."""
    text = mirror.show(SYSADMIN_REPO, "README.md")
    level = "simple"
    rows: list[Row] = []
    for line in text.splitlines():
        h = re.search(r'<a name="([a-z-]+)-(sysadmin|questions)">', line)
        if h:
            level = h.group(1)
        m = re.search(r"<summary><b>(.+?)</b></summary>", line)
        if not m:
            continue
        q = re.sub(r"<[^>]+>", "", m.group(1))
        q = clean(q.replace("***", ""))
        if len(q) >= 12:
            rows.append(Row(q, "code", f"sysadmin_skills/{level}", "MIT"))
    return rows


DSI_REPO = "alexeygrigorev/data-science-interviews"


def dsi_technical(mirror: Mirror) -> list[Row]:
    """SQL / Python / algorithm tasks of data-science-interviews technical.md (CC-BY-4.0) → code."""
    text = mirror.show(DSI_REPO, "technical.md")
    section = ""
    rows: list[Row] = []
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip().lower()
            continue
        m = re.match(r"^\*\*\d+\)\s*(.+)$", line)
        if not m:
            continue
        q = clean(re.sub(r"\*\*", "", m.group(1)))
        if section == "sql":
            q = f"Write an SQL query: {q}" if not q.lower().startswith(("write", "select")) else q
        sub = "sql" if section == "sql" else ("python" if "python" in section else "algorithms")
        rows.append(Row(q, "code", f"ds_interviews/{sub}", "CC-BY-4.0"))
    return rows


JSQ_REPO = "lydiahallie/javascript-questions"


def js_questions(mirror: Mirror) -> list[Row]:
    """JavaScript MC questions (MIT): title + code block + options `- A: …` (code MC with pasted code)."""
    text = mirror.show(JSQ_REPO, "README.md")
    rows: list[Row] = []
    for block in re.split(r"^###### \d+\. ", text, flags=re.M)[1:]:
        body = block.split("<details>")[0].split("\n---")[0]
        body = clean(body, keep_indent=True)
        if "- A:" in body and len(body) >= 20:
            rows.append(Row(cap(body), "code", "js_questions/mc", "MIT"))
    return rows


EXERCISM_REPO = "exercism/problem-specifications"


def _strip_md_links(text: str) -> str:
    text = re.sub(r"\[([^\]]+)\]\[[^\]]*\]", r"\1", text)  # [text][ref]
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # [text](url)
    return re.sub(r"^\[[^\]]+\]:\s*\S+.*$", "", text, flags=re.M)  # reference definitions


def exercism_tasks(mirror: Mirror) -> list[Row]:
    """Exercism problem specifications (MIT) → code: one-line blurbs and full task descriptions."""
    paths = mirror.ls(EXERCISM_REPO)
    names = sorted({p.split("/")[1] for p in paths if re.match(r"^exercises/[^/]+/metadata\.toml$", p)})
    rows: list[Row] = []
    for name in names:
        if f"exercises/{name}/.deprecated" in paths:
            continue
        meta = mirror.show(EXERCISM_REPO, f"exercises/{name}/metadata.toml")
        blurb = re.search(r'^blurb\s*=\s*"(.*)"\s*$', meta, re.M)
        if blurb:
            rows.append(Row(clean(blurb.group(1)), "code", "exercism/blurb", "MIT"))
        # instructions.md states the task; introduction.md is often only a story, so it is left out
        parts = [f"exercises/{name}/{f}" for f in ("instructions.md", "description.md")]
        body = next((mirror.show(EXERCISM_REPO, p) for p in parts if p in paths), "")
        body = re.sub(r"^#+ (Description|Introduction|Instructions)\s*$", "", body, flags=re.M)
        body = clean(_strip_md_links(body))
        if len(body) >= 40:
            rows.append(Row(cap(body), "code", "exercism/description", "MIT"))
    return rows


THIRTY_REPO = "30-seconds/30-seconds-of-interviews"


def thirty_seconds_questions(mirror: Mirror) -> list[Row]:
    """30 seconds of interviews (MIT): the `### question` of each file (JS/CSS/HTML/React, with code) → code."""
    rows: list[Row] = []
    for path in mirror.ls(THIRTY_REPO):
        if not (path.startswith("questions/") and path.endswith(".md")):
            continue
        text = mirror.show(THIRTY_REPO, path)
        m = re.search(r"^### (.+?)(?=^#### Answer)", text, re.S | re.M)
        if m:
            rows.append(Row(cap(clean(m.group(1), keep_indent=True)), "code", "thirty_sec_interviews/question",
                            "MIT"))
    return rows


KARAN_REPO = "karan/Projects"


def karan_projects(mirror: Mirror) -> list[Row]:
    """Programming project ideas (MIT): `**Title** - description` → `Title - description` → code."""
    rows: list[Row] = []
    for m in re.finditer(r"^\*\*(.+?)\*\*\s*-\s*(.+)$", mirror.show(KARAN_REPO, "README.md"), re.M):
        rows.append(Row(clean(f"{m.group(1)} - {m.group(2)}"), "code", "karan_projects/idea", "MIT"))
    return rows


DM_REPO = "donnemartin/interactive-coding-challenges"


def coding_challenges(mirror: Mirror) -> list[Row]:
    """Interactive coding challenges (Apache-2.0): the `## Problem:` statement of each challenge → code."""
    rows: list[Row] = []
    for path in mirror.ls(DM_REPO):
        if not path.endswith("_challenge.ipynb"):
            continue
        cells = json.loads(mirror.show(DM_REPO, path))["cells"]
        for cell in cells:
            src = "".join(cell["source"]) if cell["cell_type"] == "markdown" else ""
            m = re.match(r"^## Problem:\s*(.+?)(\n\s*\n|\n\*|$)", src, re.S)
            if m:
                problem = clean(m.group(1))
                if len(problem.split()) >= 3:  # bare puzzle names ("Utopian Tree") say nothing
                    rows.append(Row(problem, "code", "coding_challenges/problem", "Apache-2.0"))
                break
    return rows


AGI_REPO = "ruixiangcui/AGIEval"
AGI_TASKS = {"lsat-lr": 320, "lsat-rc": 160, "lsat-ar": 160, "sat-en": 160}


def agieval_general(mirror: Mirror, rng: random.Random) -> list[Row]:
    """AGIEval English LSAT/SAT reading+reasoning MC (MIT) → general; domain-keyword items dropped."""
    rows: list[Row] = []
    for task, limit in AGI_TASKS.items():
        items = [json.loads(x) for x in mirror.show(AGI_REPO, f"data/v1/{task}.jsonl").splitlines() if x.strip()]
        rng.shuffle(items)
        kept = 0
        for it in items:
            passage = clean(it.get("passage") or "")
            question = clean(it["question"])
            opts = "\n".join(clean(o) for o in it["options"])
            if GENERAL_DROP_RE.search(passage + " " + question + " " + opts):
                continue
            tail = f"{question}\n{opts}"
            text = with_context(passage, tail) if passage else cap(tail)
            rows.append(Row(text, "general", f"agieval/{task}", "MIT"))
            kept += 1
            if kept >= limit:
                break
    return rows


PUBMED_REPO = "pubmedqa/pubmedqa"


def pubmedqa_general(mirror: Mirror, rng: random.Random) -> list[Row]:
    """PubMedQA expert-labelled set (MIT) → general: the question alone, or abstract + question."""
    data: dict[str, dict[str, object]] = json.loads(mirror.show(PUBMED_REPO, "data/ori_pqal.json"))
    keys = sorted(data)
    rng.shuffle(keys)
    rows: list[Row] = []
    for i, k in enumerate(keys):
        item = data[k]
        q = clean(str(item["QUESTION"]))
        contexts = item["CONTEXTS"]
        if i % 3 == 0 and isinstance(contexts, list):
            text = with_context("\n".join(clean(str(c)) for c in contexts), q)
            rows.append(Row(text, "general", "pubmedqa/abstract_question", "MIT"))
        else:
            rows.append(Row(q, "general", "pubmedqa/question", "MIT"))
    return rows


POLICY_REPO = "wasiahmad/PolicyQA"


def policyqa_legal(mirror: Mirror) -> list[Row]:
    """PolicyQA (MIT) questions about website privacy policies → legal, without the policy passages.

    The passages are OPP-115 policy segments (a research-only corpus that LegalBench's reserved `opp115_*`
    tasks are also built from), so only the questions, written by PolicyQA's annotators, are used.
    """
    rows: list[Row] = []
    for split in ("dev", "test"):
        data = json.loads(mirror.show(POLICY_REPO, f"data/{split}.json"))["data"]
        for doc in data:
            for para in doc["paragraphs"]:
                for qa in para["qas"]:
                    rows.append(Row(clean(qa["question"]), "legal", "policyqa/question", "MIT"))
    return rows


LEXAM_REPO = "LEXam-Benchmark/LEXam"


def _xlsx_rows(mirror: Mirror, repo: str, path: str) -> list[dict[str, object]]:
    openpyxl = importlib.import_module("openpyxl")

    with tempfile.NamedTemporaryFile(suffix=".xlsx") as tmp:
        subprocess.run(["git", "--git-dir", str(mirror.git_dir(repo)), "show", f"{REPOS[repo]}:{path}"],
                       check=True, stdout=tmp)
        tmp.flush()
        sheet = openpyxl.load_workbook(tmp.name, read_only=True).active
        rows = list(sheet.iter_rows(values_only=True))
    header = [str(h) for h in rows[0]]
    return [dict(zip(header, r, strict=False)) for r in rows[1:]]


def lexam_legal(mirror: Mirror) -> list[Row]:
    """LEXam law-exam questions (data CC-BY-4.0), English only → legal: MC and open exam questions."""
    if importlib.util.find_spec("openpyxl") is None:
        print("skipping LEXam: needs openpyxl", file=sys.stderr)
        return []
    import ast

    rows: list[Row] = []
    for item in _xlsx_rows(mirror, LEXAM_REPO, "data/MCQs_test.xlsx"):
        if item.get("language") != "en":
            continue
        choices = ast.literal_eval(str(item["choices"]))
        opts = "\n".join(f"{MC_LETTERS[i]}. {clean(str(c))}" for i, c in enumerate(choices))
        question = clean(str(item["question"]))
        text = question + "\n\n" + opts
        if len(text) > MAX_CHARS:
            text = with_context(question, opts)
        rows.append(Row(text, "legal", "lexam/mcq", "CC-BY-4.0"))
    for split in ("dev", "test"):
        for item in _xlsx_rows(mirror, LEXAM_REPO, f"data/open_questions_{split}.xlsx"):
            if item.get("language") != "en":
                continue
            rows.append(Row(cap(clean(str(item["question"]))), "legal", "lexam/open_question", "CC-BY-4.0"))
    return rows


MDS_REPO = "deepmind/mathematics_dataset"


def mathematics_dataset(mirror: Mirror, per_module: int, mc_per_module: int, seed: int) -> list[Row]:
    """Terse generated math commands from deepmind/mathematics_dataset (Apache-2.0) → math.

    `per_module` plain questions per module and difficulty; `mc_per_module` more become MC items whose
    three distractors are answers of other problems of the same module (so options look alike).
    """
    if not all(importlib.util.find_spec(m) for m in ("numpy", "six", "sympy", "absl")):
        print("skipping mathematics_dataset: run with an interpreter that has six, sympy==1.5.1, numpy<1.24",
              file=sys.stderr)
        return []
    tmp = Path(tempfile.mkdtemp(prefix="mds-"))
    mirror.export(MDS_REPO, tmp)
    sys.path.insert(0, str(tmp))
    random.seed(seed)
    importlib.import_module("numpy").random.seed(seed)
    generate = importlib.import_module("mathematics_dataset.generate")
    modules = importlib.import_module("mathematics_dataset.modules.modules")

    flat: dict[str, Callable[[], object]] = {}

    def add(d: dict[str, object], prefix: str = "") -> None:
        for k, v in sorted(d.items()):
            name = f"{prefix}__{k}" if prefix else k
            if isinstance(v, dict):
                add(v, name)
            elif callable(v):
                flat[name] = v

    for level, difficulty in enumerate(("easy", "medium", "hard")):
        add(modules.train(generate._make_entropy_fn(level, 3)), difficulty)
    rows: list[Row] = []
    mc_rng = random.Random(seed)
    for name, fn in flat.items():
        group = name.split("__")[1]
        problems: list[tuple[str, str]] = []
        for _ in range(per_module + mc_per_module):
            try:
                problem = fn()
            except Exception:  # a generator failing under this sympy/numpy: skip the module
                break
            q = clean(str(problem.question))  # type: ignore[attr-defined]
            if 8 <= len(q) <= 400:
                problems.append((q, clean(str(problem.answer))))  # type: ignore[attr-defined]
        for q, _ in problems[:per_module]:
            rows.append(Row(q, "math", f"mathematics_dataset/{group}", "Apache-2.0"))
        answers = sorted({a for _, a in problems})
        for q, a in problems[per_module:]:
            others = [x for x in answers if x != a]
            if len(others) < 3 or len(a) > 60:
                continue
            options = [*mc_rng.sample(others, 3), a]
            mc_rng.shuffle(options)
            if mc_rng.random() < 0.5:
                opts = "\n".join(f"{MC_LETTERS[j]}. {o}" for j, o in enumerate(options))
            else:
                opts = "  ".join(f"({MC_LETTERS[j]}) {o}" for j, o in enumerate(options))
            rows.append(Row(f"{q}\n{opts}", "math", f"mathematics_dataset_mc/{group}", "Apache-2.0"))
    return rows


MATHDIAL_REPO = "eth-nlped/mathdial"
GSM_REPO = "openai/grade-school-math"


def mathdial_conversations(mirror: Mirror, rng: random.Random) -> list[Conversation]:
    """MathDial tutoring dialogues (CC-BY-SA-4.0): student = user, teacher = assistant → math follow-ups.

    The first user turn is the word problem itself; the dialogue is cut after a random student turn
    (at least the second user turn), so the last turn depends on the conversation for its domain.
    """
    gsm_train = {norm(json.loads(x)["question"]) for x in
                 mirror.show(GSM_REPO, "grade_school_math/data/train.jsonl").splitlines() if x.strip()}
    convs: list[Conversation] = []
    for line in mirror.show(MATHDIAL_REPO, "data/test.jsonl").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if norm(item["question"]) not in gsm_train:
            continue  # only problems provably from GSM8K *train* (GSM8K test is reserved)
        turns: list[tuple[str, str]] = [("user", clean(item["question"]))]
        for raw in item["conversation"].split("|EOM|"):
            who, _, said = raw.partition(":")
            said = clean(re.sub(r"^\s*\([a-z]+\)", "", said))
            if not said:
                continue
            role = "assistant" if who.strip().lower() == "teacher" else "user"
            if turns and turns[-1][0] == role:
                if said not in turns[-1][1]:  # the export repeats some turns verbatim
                    turns[-1] = (role, turns[-1][1] + "\n" + said)
            else:
                turns.append((role, said))
        user_ends = [i for i, (r, _) in enumerate(turns) if r == "user" and i >= 2]
        if not user_ends:
            continue
        end = rng.choice(user_ends)
        msgs = tuple((r, cap(c)) for r, c in turns[: end + 1])
        convs.append(Conversation(msgs, "math", "mathdial/test", "CC-BY-SA-4.0", "follow_up"))
    return convs


SGD_REPO = "google-research-datasets/dstc8-schema-guided-dialogue"
SGD_FINANCE = {"Banks_1", "Banks_2", "Payment_1"}  # bank accounts, transfers, payments to contacts


def _json_arrays(text: str) -> list[dict[str, object]]:
    return list(json.loads(text))


def sgd_conversations(mirror: Mirror, rng: random.Random, general_cap: int) -> list[Conversation]:
    """Schema-Guided Dialogue (CC-BY-SA-4.0): real multi-domain assistant dialogues, SYSTEM → assistant.

    A user turn's expert is `finance` when its frame's service is a bank/payment service, else `general`.
    Per dialogue: a `switch` sample cut at the first user turn whose expert differs from the previous
    user turn's (e.g. event tickets → "transfer $50 to Jane"), and a `follow_up` sample cut at a later user
    turn of a segment (e.g. "Yes, from my savings account"). General-only follow-ups are capped.
    """
    files = [p for p in mirror.ls(SGD_REPO) if re.match(r"^(train|dev|test)/dialogues_\d+\.json$", p)]
    convs: list[Conversation] = []
    general_follow: list[Conversation] = []
    for path in files:
        try:
            dialogues = _json_arrays(mirror.show(SGD_REPO, path))
        except subprocess.CalledProcessError:
            continue  # file absent from the snapshot (large files are left out)
        for d in dialogues:
            msgs: list[tuple[str, str]] = []
            experts: list[str] = []  # per message; "" for assistant turns
            for t in d["turns"]:  # type: ignore[attr-defined]
                frames = t.get("frames") or [{}]
                service = str(frames[0].get("service", ""))
                if t["speaker"] == "USER":
                    msgs.append(("user", clean(t["utterance"])))
                    experts.append("finance" if service in SGD_FINANCE else "general")
                else:
                    msgs.append(("assistant", clean(t["utterance"])))
                    experts.append("")
            users = [i for i, (r, _) in enumerate(msgs) if r == "user"]
            if len(users) < 2:
                continue
            switches = [b for a, b in itertools.pairwise(users) if experts[a] != experts[b]]
            if switches:
                i = switches[0]
                convs.append(Conversation(tuple(msgs[: i + 1]), experts[i], f"sgd_dialogue/switch_{experts[i]}",
                                          "CC-BY-SA-4.0", "switch"))
            follow = [b for a, b in itertools.pairwise(users) if experts[a] == experts[b]]
            if follow:
                i = rng.choice(follow)
                conv = Conversation(tuple(msgs[: i + 1]), experts[i], f"sgd_dialogue/follow_up_{experts[i]}",
                                    "CC-BY-SA-4.0", "follow_up")
                (convs if experts[i] == "finance" else general_follow).append(conv)
    rng.shuffle(general_follow)
    return convs + general_follow[:general_cap]


IRC_REPO = "jkkummerfeld/irc-disentanglement"
IRC_LINE_RE = re.compile(r"^\[[0-9:]+\] <([^>]+)> (.*)$")
HELP_RE = re.compile(r"\?|\b(how|help|anyone|anybody|is there|can i|why|what|where|problem|error)\b", re.I)


def _threads(annotation: str) -> list[list[int]]:
    """Connected components of the annotated reply links (`a b -` links message a and b)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for line in annotation.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            a, b = int(parts[0]), int(parts[1])
            parent[find(a)] = find(b)
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for x in list(parent):
        groups[find(x)].append(x)
    return [sorted(g) for g in groups.values()]


def irc_conversations(mirror: Mirror, rng: random.Random, cap_n: int) -> list[Conversation]:
    """Disentangled #ubuntu IRC help threads (data CC-BY-4.0) → code follow-ups.

    In a thread, the person who wrote its first message is the `user`, everyone who answers is the
    `assistant` (consecutive lines of one side are merged, a leading "nick:" address is removed). Cut after
    a seeded user turn from the second on, so the last turn relies on the thread ("still says permission
    denied", "ok done, now what?").
    """
    paths = mirror.ls(IRC_REPO)
    files = [p[: -len(".annotation.txt")] for p in paths
             if re.match(r"^data/(train|dev|test)/.+\.annotation\.txt$", p)]
    convs: list[Conversation] = []
    for base in files:
        if f"{base}.ascii.txt" not in paths:
            continue
        lines = mirror.show(IRC_REPO, f"{base}.ascii.txt").split("\n")
        for thread in _threads(mirror.show(IRC_REPO, f"{base}.annotation.txt")):
            said = [IRC_LINE_RE.match(lines[i]) for i in thread if i < len(lines)]
            msgs_raw = [(m.group(1), m.group(2)) for m in said if m]
            if len(msgs_raw) < 4:
                continue
            asker = msgs_raw[0][0]
            nicks = {n for n, _ in msgs_raw}
            msgs: list[tuple[str, str]] = []
            for nick, text in msgs_raw:
                head = re.match(r"^([^\s:,]+)[:,]\s*(.*)$", text)
                if head and head.group(1) in nicks:
                    text = head.group(2)
                text = clean(text)
                if not text:
                    continue
                role = "user" if nick == asker else "assistant"
                if msgs and msgs[-1][0] == role:
                    msgs[-1] = (role, msgs[-1][1] + "\n" + text)
                else:
                    msgs.append((role, text))
            users = [i for i, (r, _) in enumerate(msgs) if r == "user" and i >= 2]
            if not users or not HELP_RE.search(msgs[0][1]):
                continue  # threads must open with a question (not join a discussion midway)
            end = rng.choice(users)
            convs.append(Conversation(tuple((r, cap(c)) for r, c in msgs[: end + 1]), "code",
                                      "ubuntu_irc/thread", "CC-BY-4.0", "follow_up"))
    rng.shuffle(convs)
    return convs[:cap_n]


SGD_FINANCE_WORDS = re.compile(
    r"\b(balance|transfer|account|savings|checking|send|pay|payment|money|bank|deposit|\$\d)", re.I)


def sgd_finance_turns(mirror: Mirror, rng: random.Random, cap_n: int) -> list[Row]:
    """Later user turns of SGD bank/payment dialogues (CC-BY-SA-4.0) that stand alone → finance.

    The shared dataset has the *first* user turn of each dialogue (family `sgd`); these are later turns
    that name a bank/payment action themselves ("Can you check my balance in my checking account?").
    Same family name `sgd`, so leave-one-family-out keeps the dataset in one fold.
    """
    files = [p for p in mirror.ls(SGD_REPO) if re.match(r"^(train|dev|test)/dialogues_\d+\.json$", p)]
    rows: list[Row] = []
    for path in files:
        try:
            dialogues = _json_arrays(mirror.show(SGD_REPO, path))
        except subprocess.CalledProcessError:
            continue
        for d in dialogues:
            users = [t for t in d["turns"] if t["speaker"] == "USER"]  # type: ignore[attr-defined]
            for t in users[1:]:
                frames = t.get("frames") or [{}]
                text = clean(t["utterance"])
                if (str(frames[0].get("service", "")) in SGD_FINANCE and len(text.split()) >= 5
                        and SGD_FINANCE_WORDS.search(text)):
                    rows.append(Row(text, "finance", "sgd/finance_later_turns", "CC-BY-SA-4.0"))
    rng.shuffle(rows)
    return rows[:cap_n]


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------

# label|family -> cap on rows kept (seeded sample), so no single source dominates a label
CAPS: dict[str, int] = {
    "math|mathematics_dataset": 700,
    "math|mathematics_dataset_mc": 350,
    "general|pubmedqa": 600,
    "legal|policyqa": 450,
    "finance|sgd": 400,
}


def load_shared(shared: Path) -> set[str]:
    seen: set[str] = set()
    for name in ("train.jsonl", "dev.jsonl"):
        for line in (shared / name).read_text(encoding="utf-8").split("\n"):
            if line.strip():
                seen.add(norm(json.loads(line)["text"]))
    return seen


def dedupe_and_cap(rows: Iterable[Row], shared_seen: set[str],
                   rng_for: Callable[[str], random.Random]) -> tuple[list[Row], int]:
    seen = set(shared_seen)
    unique: list[Row] = []
    dropped_shared = 0
    for r in rows:
        n = norm(r.text)
        if n in seen:
            dropped_shared += n in shared_seen
            continue
        seen.add(n)
        unique.append(r)
    groups: dict[str, list[Row]] = collections.defaultdict(list)
    for r in unique:
        groups[f"{r.label}|{r.source.split('/')[0]}"].append(r)
    kept: list[Row] = []
    for key in sorted(groups):
        items = groups[key]
        if key in CAPS and len(items) > CAPS[key]:
            items = rng_for(f"cap/{key}").sample(items, CAPS[key])
        kept.extend(items)
    return kept, dropped_shared


def contamination_filter(path: Path, tool: Path) -> tuple[int, int, str]:
    """Runs the shared contamination tool on `path` and removes MATCH and NEAR rows in place."""
    out = subprocess.run([sys.executable, str(tool), str(path)], capture_output=True, text=True).stdout
    bad = {int(m.group(1)) for m in re.finditer(rf"^{re.escape(str(path))}:(\d+): (MATCH|NEAR)", out, re.M)}
    match = len(re.findall(r": MATCH ", out))
    near = len(re.findall(r": NEAR ", out))
    if bad:
        lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
        path.write_text("".join(x + "\n" for i, x in enumerate(lines, 1) if i not in bad), encoding="utf-8")
    return match, near, out.strip().splitlines()[-1] if out.strip() else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mirror", type=Path, default=Path("/work/.mirror"))
    ap.add_argument("--shared", type=Path, default=Path("/work/shared/data/routing"))
    ap.add_argument("--tool", type=Path, default=Path("/work/shared/tools/contamination.py"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=15)
    a = ap.parse_args()
    if os.environ.get("PYTHONHASHSEED") != "0":  # the generator's output depends on set order
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    mirror = Mirror(a.mirror)

    def rng_for(name: str) -> random.Random:
        """One seeded stream per source, so adding a source leaves the others' rows unchanged."""
        return random.Random(f"{a.seed}/{name}")

    rows: list[Row] = []
    rows += openstax_economics(mirror)
    rows += openstax_econ_glossary(mirror, rng_for("econ_glossary"))
    rows += openstax_python(mirror)
    rows += h5bp_questions(mirror)
    rows += sysadmin_questions(mirror)
    rows += dsi_technical(mirror)
    rows += js_questions(mirror)
    rows += exercism_tasks(mirror)
    rows += karan_projects(mirror)
    rows += thirty_seconds_questions(mirror)
    rows += coding_challenges(mirror)
    rows += agieval_general(mirror, rng_for("agieval_general"))
    rows += pubmedqa_general(mirror, rng_for("pubmedqa_general"))
    rows += policyqa_legal(mirror)
    rows += lexam_legal(mirror)
    rows += sgd_finance_turns(mirror, rng_for("sgd_turns"), cap_n=1500)
    rows += mathematics_dataset(mirror, per_module=8, mc_per_module=4, seed=a.seed)
    kept, dropped_shared = dedupe_and_cap(rows, load_shared(a.shared), rng_for)
    kept.sort(key=lambda r: (r.label, r.source, r.text))
    convs = mathdial_conversations(mirror, rng_for("mathdial"))
    convs += sgd_conversations(mirror, rng_for("sgd"), general_cap=400)
    convs += irc_conversations(mirror, rng_for("irc"), cap_n=500)

    a.out.mkdir(parents=True, exist_ok=True)
    extra = a.out / "extra_train.jsonl"
    conv = a.out / "conversations.jsonl"
    extra.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    conv.write_text("".join(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    for path in (extra, conv):
        match, near, summary = contamination_filter(path, a.tool)
        print(f"{path.name}: contamination {summary!r}; removed {match} MATCH + {near} NEAR rows")
    print(f"dropped {dropped_shared} rows already in shared train/dev")
    final = [json.loads(x) for x in extra.read_text(encoding="utf-8").split("\n") if x]
    by_label = collections.Counter(r["label"] for r in final)
    by_source = collections.Counter(f"{r['label']:8s} {r['source']}" for r in final)
    print(f"extra_train.jsonl: {len(final)} rows {dict(sorted(by_label.items()))}")
    for k, v in sorted(by_source.items()):
        print(f"  {k}: {v}")
    convs_final = [json.loads(x) for x in conv.read_text(encoding="utf-8").split("\n") if x]
    print(f"conversations.jsonl: {len(convs_final)} rows "
          f"{dict(collections.Counter((c['label'], c['kind'], c['source']) for c in convs_final))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
