"""Every command on corrupted copies of each data format it reads and on nonsense flag values.

Each case runs `moekit` in-process from an empty folder, under a per-case alarm (a hang fails the case
instead of the suite), and must: exit with code 2, print exactly one line on stderr that names the
file or the flag at fault (and no traceback), and leave no file behind but those that existed before.
`test_case_count` states how many cases there are.
"""

from __future__ import annotations

import gzip
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.data.paths import asset_path
from tests.commands.test_own_data import make_table, write_log
from tests.commands.test_retrieval_commands import _write_ml100k

ALARM_SECONDS = 60


@dataclass
class Case:
    """argv (with {placeholders} for the data's paths), a corruption of the data, the expected words."""

    name: str
    argv: str
    expect: str
    corrupt: Callable[[Path], None] = lambda root: None
    setup: list[str] = field(default_factory=list)  # commands that must succeed first (e.g. train a run)


# --- corruptions of each format -------------------------------------------------------------


def rewrite(relative: str, transform: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / relative
        path.write_bytes(transform(path.read_bytes()))
    return apply


def replace_file(relative: str, content: bytes) -> Callable[[Path], None]:
    return rewrite(relative, lambda _: content)


def gz_text(relative: str, transform: Callable[[str], str]) -> Callable[[Path], None]:
    """Edit the text inside a .gz file."""
    return rewrite(relative, lambda raw: gzip.compress(transform(gzip.decompress(raw).decode("latin-1"))
                                                       .encode("latin-1")))


def line_edit(index: int, transform: Callable[[str], str]) -> Callable[[str], str]:
    def apply(text: str) -> str:
        lines = text.split("\n")
        lines[index] = transform(lines[index])
        return "\n".join(lines)
    return apply


def truncate_gz(relative: str) -> Callable[[Path], None]:
    return rewrite(relative, lambda raw: raw[: len(raw) // 2])


def not_gzip(relative: str) -> Callable[[Path], None]:
    return rewrite(relative, lambda raw: gzip.decompress(raw))


def text_edit(relative: str, transform: Callable[[str], str]) -> Callable[[Path], None]:
    return rewrite(relative, lambda raw: transform(raw.decode("utf-8")).encode("utf-8"))


def both(*corruptions: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        for corruption in corruptions:
            corruption(root)
    return apply


CENSUS = "data/census-income/census-income.test.gz"
UDATA, UITEM, UUSER = "data/ml-100k/u.data", "data/ml-100k/u.item", "data/ml-100k/u.user"
BEAUTY, ATTRS = "data/amazon-beauty/Beauty.txt.gz", "data/amazon-beauty/Beauty_item2attributes.json"
TEXT = "data/text/tinyshakespeare.txt"
TABLE, LOG, ITEMS, USERS = "own/table.csv", "own/log.tsv", "own/items.csv", "own/users.csv"

MTL = "train mtl --data-dir {data}/census-income --no-progress --out run train.epochs=1"
SEQREC_ML = "train seqrec --dataset ml-100k --data-dir {data}/ml-100k --core 0 --no-progress --out run --epochs 1"
SEQREC_BEAUTY = "train seqrec --dataset beauty --data-dir {data}/amazon-beauty --no-progress --out run --epochs 1"
TWO_TOWER = "train two-tower --data-dir {data}/ml-100k --no-progress --out run --epochs 1 --ks 1,5"
DQN = "train dqn --data-dir {data}/ml-100k --out run --steps 50"
LM = ("train lm --data-dir {data}/text/tinyshakespeare.txt --no-progress --out run train.max_steps=1 "
      "model.block_size=16 model.n_layer=1")
OWN_MTL = "train mtl --data {own}/table.csv --tasks click,purchase --no-progress --out run train.epochs=1"
OWN_SEQREC = ("train seqrec --data {own}/log.tsv --user-column uid --item-column sku --time-column when "
              "--no-progress --out run --epochs 1")
OWN_TWO_TOWER = ("train two-tower --data {own}/log.tsv --user-column uid --item-column sku --time-column when "
                 "--users {own}/users.csv --no-progress --out run --epochs 1 --ks 1,3")

DATA_CASES = [
    # Census-Income (latin-1 text: every byte is a character, so there is no undecodable case)
    Case("census: truncated gzip", MTL, f"{CENSUS} is a truncated or corrupt gzip file", truncate_gz(CENSUS)),
    Case("census: not gzip", MTL, f"{CENSUS} ends in .gz but is not gzip-compressed", not_gzip(CENSUS)),
    Case("census: empty", MTL, f"{CENSUS} is empty", replace_file(CENSUS, gzip.compress(b""))),
    Case("census: wrong delimiter", MTL, f"{CENSUS}, line 1: expected 42 fields separated by ', ', got 1",
         gz_text(CENSUS, lambda t: t.replace(", ", "\t"))),
    Case("census: wrong column count", MTL, f"{CENSUS}, line 3: expected 42 fields",
         gz_text(CENSUS, line_edit(2, lambda line: line.rsplit(", ", 1)[0]))),
    Case("census: non-numeric", MTL, f"{CENSUS}, line 2: column 'age' is not a number: 'old'",
         gz_text(CENSUS, line_edit(1, lambda line: "old" + line[line.index(","):]))),
    Case("census: income label out of range", MTL, f"{CENSUS}, line 4: the income label is 'maybe.'",
         gz_text(CENSUS, line_edit(3, lambda line: line.rsplit(", ", 1)[0] + ", maybe."))),
    Case("census: missing folder", "train mtl --data-dir {data}/nowhere --out run", "data/nowhere does not exist"),
    # MovieLens u.data / u.item / u.user
    Case("u.data: empty", SEQREC_ML, f"{UDATA} is empty", replace_file(UDATA, b"")),
    Case("u.data: wrong delimiter", SEQREC_ML, f"{UDATA}:1: expected 4 fields separated by '\\t', got 1",
         text_edit(UDATA, lambda t: t.replace("\t", ","))),
    Case("u.data: wrong column count", SEQREC_ML, f"{UDATA}:2: expected 4 fields",
         text_edit(UDATA, line_edit(1, lambda line: line.rsplit("\t", 1)[0]))),
    Case("u.data: non-numeric", SEQREC_ML, f"{UDATA}:3: expected four integers",
         text_edit(UDATA, line_edit(2, lambda line: "abc" + line[line.index("\t"):]))),
    Case("u.data: rating out of range", SEQREC_ML, f"{UDATA}: rating 9 outside 1..5",
         text_edit(UDATA, line_edit(0, lambda line: "\t".join([*line.split("\t")[:2], "9", *line.split("\t")[3:]])))),
    Case("u.data: empty (two-tower)", TWO_TOWER, f"{UDATA} is empty", replace_file(UDATA, b"")),
    Case("u.data: empty (dqn)", DQN, f"{UDATA} is empty", replace_file(UDATA, b"")),
    Case("u.item: non-numeric id", TWO_TOWER, f"{UITEM}:1: the movie id must be an integer",
         text_edit(UITEM, line_edit(0, lambda line: "x" + line))),
    Case("u.item: genre flag out of range", TWO_TOWER, f"{UITEM}:2: genre flags must be 0/1",
         text_edit(UITEM, line_edit(1, lambda line: line[:-1] + "2"))),
    Case("u.user: gender out of range", TWO_TOWER, f"{UUSER}:1: gender must be F or M",
         text_edit(UUSER, line_edit(0, lambda line: line.replace("|M|", "|X|").replace("|F|", "|X|")))),
    # Amazon Beauty
    Case("beauty: truncated gzip", SEQREC_BEAUTY, f"{BEAUTY} is a truncated or corrupt gzip file",
         truncate_gz(BEAUTY)),
    Case("beauty: not gzip", SEQREC_BEAUTY, f"{BEAUTY} ends in .gz but is not gzip-compressed", not_gzip(BEAUTY)),
    Case("beauty: non-numeric item", SEQREC_BEAUTY, f"{BEAUTY}, line 2: invalid literal",
         gz_text(BEAUTY, line_edit(1, lambda line: line + " ten"))),
    Case("beauty: user without items", SEQREC_BEAUTY, f"{BEAUTY}, line 1: a user with no items",
         gz_text(BEAUTY, line_edit(0, lambda line: line.split()[0]))),
    Case("beauty: attributes JSON malformed", SEQREC_BEAUTY, f"{ATTRS}, line 1, column",
         replace_file(ATTRS, b'{"1": [1, 2], "2": ')),
    Case("beauty: attributes not UTF-8", SEQREC_BEAUTY, f"{ATTRS} is not utf-8 text",
         replace_file(ATTRS, b"\xff\xfe{}")),
    # LM text
    Case("text: empty", LM, f"{TEXT} is empty", replace_file(TEXT, b"")),
    Case("text: binary", LM, f"{TEXT} is not UTF-8 text (byte 3", replace_file(TEXT, b"abc\xff\x00\x01" * 100)),
    Case("text: shorter than the context", LM + " model.block_size=4096",
         "fewer than model.block_size + 1 = 4097"),
    # your own table
    Case("table: empty", OWN_MTL, f"{TABLE} is empty", replace_file(TABLE, b"")),
    Case("table: header only", OWN_MTL, f"{TABLE} has a header but no rows",
         text_edit(TABLE, lambda t: t.split("\n")[0] + "\n")),
    Case("table: missing column", OWN_MTL.replace("click,purchase", "click,bought"), "no column 'bought'"),
    Case("table: binary label out of range", OWN_MTL + ' data.task_types={{"click":"binary"}}',
         f"{TABLE}, line 3: task 'click' is binary but its label is '7'",
         text_edit(TABLE, line_edit(2, lambda line: ",".join(line.split(",")[:4] + ["7"] + line.split(",")[5:])))),
    Case("table: non-numeric", OWN_MTL + " --numeric age", f"{TABLE}, line 2: column 'age' is not a number: 'old'",
         text_edit(TABLE, line_edit(1, lambda line: ",".join(line.split(",")[:2] + ["old"] + line.split(",")[3:])))),
    Case("table: wrong delimiter", OWN_MTL + " --delimiter ,",
         "(one column only: is the delimiter right? pass --delimiter)",
         text_edit(TABLE, lambda t: t.replace(",", ";"))),
    Case("table: not UTF-8", OWN_MTL, f"{TABLE} is not UTF-8 text",
         rewrite(TABLE, lambda raw: raw.replace(b"fr", b"\xff\xfe", 1))),
    Case("table: truncated gzip", OWN_MTL.replace("table.csv", "table.csv.gz"),
         "table.csv.gz is a truncated or corrupt",
         lambda root: (root / "own/table.csv.gz").write_bytes(
             gzip.compress((root / TABLE).read_bytes())[:500])),
    Case("table: not parquet", OWN_MTL.replace("table.csv", "table.parquet"), "table.parquet is not a readable Parquet",
         lambda root: (root / "own/table.parquet").write_bytes(b"PAR1 not really")),
    Case("table: missing file", OWN_MTL.replace("table.csv", "nothing.csv"), "own/nothing.csv does not exist"),
    # your own log
    Case("log: missing column", OWN_SEQREC.replace("--user-column uid", "--user-column user_id"),
         "no column 'user_id'"),
    Case("log: bad time", OWN_SEQREC, f"{LOG}, line 4: column 'when' is neither a number nor a date",
         text_edit(LOG, line_edit(3, lambda line: "\t".join(line.split("\t")[:2] + ["soon"] + line.split("\t")[3:])))),
    Case("log: empty", OWN_SEQREC, f"{LOG} is empty", replace_file(LOG, b"")),
    Case("log: items file malformed", OWN_SEQREC + " --items {own}/items.csv --title-column name", "no column 'name'"),
    Case("users: a user twice", OWN_TWO_TOWER, f"{USERS}, line 32: user 'u3' appears twice",
         text_edit(USERS, lambda text: text + "u3,free\n")),
    Case("users: missing column", OWN_TWO_TOWER + " --user-feature-columns plan,tier", "no column 'tier'"),
]

FLAG_CASES = [
    Case("seqrec --max-len 0 (was a hang)", SEQREC_ML + " --max-len 0", "model.max_len must be >= 1 (got 0)"),
    Case("seqrec --max-len -1 (was a hang)", SEQREC_ML + " --max-len -1", "model.max_len must be >= 1 (got -1)"),
    Case("lm max_steps=0", LM + " train.max_steps=0", "train.max_steps must be >= 1 (got 0)"),
    Case("lm max_steps=-5", LM + " train.max_steps=-5", "train.max_steps must be >= 1 (got -5)"),
    Case("lm grad_clip=-1", LM + " train.grad_clip=-1", "train.grad_clip must be >= 0 (got -1"),
    Case("lm warmup_steps=-1", LM + " train.warmup_steps=-1", "train.warmup_steps must be >= 0 (got -1)"),
    Case("lm lr=inf", LM + " train.lr=.inf", "train.lr must be a finite number (got inf)"),
    Case("lm unknown key", LM + " model.n_layers=2", "unknown key(s) config.model.n_layers"),
    Case("lm wrong type", LM + " train.batch_size=eight", "config.train.batch_size must be an integer (got 'eight')"),
    Case("lm --device cuda without a GPU", LM + " --device cuda", "CUDA is not available"),
    Case("two-tower --ks 0", TWO_TOWER + " --ks 0", "train.ks must be >= 1 (got 0)"),
    Case("two-tower --epochs 0", TWO_TOWER + " --epochs 0", "train.epochs must be >= 1 (got 0)"),
    Case("two-tower --ks 5000 (before training)", TWO_TOWER + " --ks 5000", "train.ks: k=5000 but a user has only"),
    Case("dqn --steps 0", DQN.replace("--steps 50", "--steps 0"), "train.total_steps must be >= 1 (got 0)"),
    Case("dqn --gamma 1.5", DQN + " --gamma 1.5", "train.gamma must be <= 1.0 (got 1.5)"),
    Case("dqn unknown simulator setting", DQN + " data.simulator.boredum=0.3", "unknown key(s) data.simulator.boredum"),
    Case("dqn --resume", DQN + " --resume", "--resume is not supported for dqn runs"),
    Case("mtl --split", MTL.replace("--data-dir {data}/census-income", "--data {own}/table.csv --tasks click")
         + " --split 0.5,0.6,0.1", "data.split must be three fractions"),
    Case("mtl task weight of an unknown task", MTL + ' train.task_weights={{"nope":1}}',
         "task_weights names unknown task(s) ['nope']"),
    Case("seqrec --seeds x", SEQREC_ML + " --seeds 0 x", "--seeds takes integers (got 'x')"),
    Case("--resume without --out", "train seqrec --resume", "--resume needs --out"),
    Case("--resume and --overwrite", SEQREC_ML + " --resume --overwrite",
         "--resume and --overwrite exclude each other"),
    Case("--resume of nothing", SEQREC_ML + " --resume", "cannot resume: "),
    Case("--config missing file", "train lm --config {data}/nope.yaml", "config file "),
    Case("--config malformed YAML", "train lm --config {data}/bad.yaml", "bad.yaml, line 3: not valid YAML"),
    Case("--config unknown name", "train lm --config shakespeare_mo", "no config named 'shakespeare_mo'"),
    Case("generate --top-k -5", "generate --ckpt {data}/lm-run --top-k -5", "--top-k must be >= 0 (got -5"),
    Case("generate --top-p 0", "generate --ckpt {data}/lm-run --top-p 0", "--top-p must be in (0, 1]"),
    Case("eval lm --batch-size 0", "eval lm --ckpt {data}/lm-run --batch-size 0", "--batch-size must be >= 1 (got 0)"),
    Case("eval lm --text empty", "eval lm --ckpt {data}/lm-run --text {data}/empty.txt", "empty.txt is empty"),
    Case("eval lm NaN weights", "eval lm --ckpt {data}/nan-run --max-tokens 64", "are not finite"),
    Case("recommend -k 0", "recommend --ckpt {data}/seqrec-run --user 1 -k 0", "-k must be >= 1 (got 0)"),
    Case("recommend an LM run", "recommend --ckpt {data}/lm-run --user 1", "is an lm run, not a seqrec run"),
    Case("retrieve a seqrec run", "retrieve --ckpt {data}/seqrec-run --user 1", "is a seqrec run, not a two-tower run"),
    Case("eval a folder without a run", "eval seqrec --ckpt {data}", "is not a moekit model or run folder"),
    Case("eval corrupt weights", "eval seqrec --ckpt {data}/seqrec-run", "model.safetensors is corrupt",
         replace_file("data/seqrec-run/model.safetensors", b"not safetensors")),
    Case("eval corrupt config", "eval seqrec --ckpt {data}/seqrec-run", "config.json is not valid JSON",
         replace_file("data/seqrec-run/config.json", b"{ truncated")),
    Case("predict: missing feature column", "predict mtl --ckpt {data}/mtl-run --data {data}/nofeat.csv --out s.csv",
         "no column 'age'"),
    Case("predict --chunk-rows 0", "predict mtl --ckpt {data}/mtl-run --data {own}/table.csv --out s.csv "
         "--chunk-rows 0", "--chunk-rows must be >= 1 (got 0)"),
    Case("hf import of a folder that is not one", "hf import {data}/ml-100k --out imported", "config.json"),
]
CASES = DATA_CASES + FLAG_CASES


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Valid copies of every format, and finished runs of a few families to point checkpoints at."""
    root = tmp_path_factory.mktemp("pristine")
    data = root / "data"
    (data / "census-income").mkdir(parents=True)
    rows = gzip.open(asset_path("census-income.sample.gz"), "rt", encoding="latin-1").read().splitlines()[:600]
    (data / "census-income/census-income.test.gz").write_bytes(
        gzip.compress(("\n".join(rows) + "\n").encode("latin-1")))
    _write_ml100k(data / "ml-100k")
    (data / "amazon-beauty").mkdir()
    (data / "amazon-beauty/Beauty.txt.gz").write_bytes(gzip.compress("".join(
        f"{u} " + " ".join(str((u + j) % 9 + 1) for j in range(6)) + "\n" for u in range(1, 13)).encode()))
    (data / "amazon-beauty/Beauty_item2attributes.json").write_text('{"1": [3, 4], "2": [3]}')
    (data / "text").mkdir()
    (data / "text/tinyshakespeare.txt").write_text(
        gzip.open(asset_path("tinyshakespeare.txt.gz"), "rt").read()[:20000])
    (data / "empty.txt").write_text("")
    (data / "bad.yaml").write_text("model:\n  d_model: [1, 2\n")
    own = root / "own"
    own.mkdir()
    make_table(400).to_csv(own / "table.csv", index=False)
    write_log(own)
    make_table(20).drop(columns=["age"]).to_csv(data / "nofeat.csv", index=False)
    lm = ["train", "lm", "--data-dir", str(data / "text/tinyshakespeare.txt"), "--no-progress", "train.max_steps=2",
          "model.block_size=16", "model.n_layer=1", "train.eval_interval=2", "train.eval_tokens=64",
          "train.final_eval_tokens=64"]
    assert main([*lm, "--out", str(data / "lm-run")]) == 0
    shutil.copytree(data / "lm-run", data / "nan-run")
    from moekit.io import load_tensors, save_tensors

    tensors = load_tensors(data / "nan-run/model.safetensors")
    save_tensors(data / "nan-run/model.safetensors", {k: v * float("nan") if v.is_floating_point() else v
                                                      for k, v in tensors.items()})
    assert main(["train", "seqrec", "--dataset", "ml-100k", "--data-dir", str(data / "ml-100k"), "--core", "0",
                 "--no-progress", "--epochs", "1", "--hidden", "8", "--out", str(data / "seqrec-run")]) == 0
    assert main(["train", "mtl", "--data", str(own / "table.csv"), "--tasks", "click,purchase", "--no-progress",
                 "--epochs", "1", "--out", str(data / "mtl-run")]) == 0
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"the command ran longer than {ALARM_SECONDS} s")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(case: Case, pristine: Path, tmp_path: Path, monkeypatch, capsys):
    root = tmp_path / "root"
    shutil.copytree(pristine, root)
    case.corrupt(root)
    work = root / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MOEKIT_DATA", raising=False)
    argv = case.argv.format(data=root / "data", own=root / "own").split()
    before = snapshot(root)
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM_SECONDS)
    try:
        code = main(["--no-malloc-tuning", *argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("moekit: no --data-dir")]
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case.expect in lines[0], lines[0]
    assert snapshot(root) == before  # nothing written, nothing left behind


def test_case_count():
    """The suite's size, as the issue asks it to be stated."""
    assert len(CASES) == len({c.name for c in CASES}) >= 70
