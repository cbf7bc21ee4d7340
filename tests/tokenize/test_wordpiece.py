import itertools
import json
import os
import subprocess
import sys
from collections import Counter

from four_m.tokenize.wordpiece import learn_pieces

# Every word once, each letter equally often: nearly every merge is a tie between equal counts,
# which Hugging Face's trainer broke in a different order in each process (tokenizers#1794).
TIED_WORDS = ["".join(p) for p in itertools.permutations("abcdef", 3)]
TIED_CAPTIONS = [" ".join(TIED_WORDS[i : i + 5]) for i in range(0, len(TIED_WORDS), 5)]

TRAIN_AND_SAVE = """
import hashlib, json, sys
from pathlib import Path
from four_m.core.config import TextTokenizerConfig
from four_m.tokenize.text import TextTokenizer

captions, folder = json.loads(sys.argv[1]), Path(sys.argv[2])
tok = TextTokenizer.train(captions, TextTokenizerConfig(vocab_size=60, sentinels=2, coordinate_bins=2))
tok.save(folder)
files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
print(json.dumps({"files": files, "ids": [ids.tolist() for ids in tok.encode(captions)]}))
"""


def _train_in_new_process(folder, hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_SAVE, json.dumps(TIED_CAPTIONS), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_two_processes_write_byte_identical_tokenizers_and_ids(tmp_path):
    first = _train_in_new_process(tmp_path / "a", "1")
    second = _train_in_new_process(tmp_path / "b", "2")
    assert set(first["files"]) == {"tokenizer.json", "text_config.json"}
    assert first["files"] == second["files"]
    assert first["ids"] == second["ids"]


def test_the_order_of_the_counts_does_not_matter():
    counts = Counter(TIED_WORDS)
    backwards = dict(reversed(list(counts.items())))
    assert learn_pieces(counts, 60) == learn_pieces(backwards, 60)


def test_alphabet_first_then_the_most_frequent_pair_with_ties_to_the_smallest_ids():
    # Ids: a b c ##b ##c. Pairs (a,##b) and (b,##c) both occur 4 times; (a,##b) has the smaller ids.
    counts = {"bc": 4, "ab": 3, "abc": 1}
    assert learn_pieces(counts, 7) == ["a", "b", "c", "##b", "##c", "ab", "bc"]
    assert learn_pieces(counts, 8)[7] == "abc"  # (ab, ##c): once
    assert learn_pieces(counts, 100) == learn_pieces(counts, 8)  # no pair left


def test_repeated_letters_merge_left_to_right():
    # b ##a ##a ##a: (##a, ##a) occurs twice; merged left to right it leaves b ##aa ##a, not b ##a ##aa.
    assert learn_pieces({"baaa": 1}, 100) == ["a", "b", "##a", "##aa", "baa", "baaa"]
