"""Tests for recbole_llm.data.convert_ml1m on a small generated MovieLens-1M slice."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recbole_llm.data.convert_ml1m import convert_ml1m

REPO_ROOT = Path(__file__).resolve().parents[1]

# Realistic movies.dat lines, including the title shapes the converter must handle.
MOVIES = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::Jumanji (1995)::Adventure|Children's|Fantasy",
    "73::Misérables, Les (1995)::Drama|Musical",
    "260::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi",
    "1001::Associate, The (L'Associe)(1982)::Comedy",
    "1176::Double Life of Veronique, The (La Double Vie de Véronique) (1991)::Drama",
    "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
    "2858::American Beauty (1999)::Comedy|Drama",
    "3952::Contender, The (2000)::Drama|Thriller",
]
MOVIE_IDS = [line.split("::")[0] for line in MOVIES]

AGES = [1, 18, 25, 35, 45, 50, 56]

# Users 1..12 exist; only users 1..10 rate, so 11 and 12 must be dropped.
USERS = [
    f"{uid}::{'F' if uid % 2 else 'M'}::{AGES[uid % 7]}::{uid % 21}::{48000 + uid}"
    for uid in range(1, 13)
]
USERS[1] = "2::M::56::16::70072-1234"  # a zip code with a suffix must pass through unchanged
RATED_USERS = [str(uid) for uid in range(1, 11)]
N_RATINGS = 200


def rating_lines():
    """Return 200 ratings.dat lines grouped by user, like the real file."""
    lines = []
    for index in range(N_RATINGS):
        user = RATED_USERS[index * len(RATED_USERS) // N_RATINGS]
        movie = MOVIE_IDS[index % len(MOVIE_IDS)]
        lines.append(f"{user}::{movie}::{index % 5 + 1}::{978300760 + index}")
    return lines


def write_raw(folder, ratings=True):
    """Write the raw slice (latin-1, '\\n' endings) into ``folder``; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"movies.dat": MOVIES, "users.dat": USERS}
    if ratings:
        files["ratings.dat"] = rating_lines()
    for name, lines in files.items():
        (folder / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


def read_rows(path):
    """Return the tab-split lines of an output file, asserting UTF-8 and '\\n' endings."""
    text = path.read_bytes().decode("utf-8")
    assert "\r" not in text and text.endswith("\n")
    return [line.split("\t") for line in text[:-1].split("\n")]


@pytest.fixture
def converted(tmp_path):
    """Convert the slice; return (output folder, row counts)."""
    raw = write_raw(tmp_path / "ml-1m-slice")
    counts = convert_ml1m(raw, tmp_path / "datasets", "slice")
    return tmp_path / "datasets" / "slice", counts


def test_counts_and_files(converted):
    folder, counts = converted
    assert counts == {"inter": N_RATINGS, "item": len(MOVIES), "user": len(RATED_USERS)}
    # Only the three atomic files: no temporary file is left behind.
    assert sorted(p.name for p in folder.iterdir()) == ["slice.inter", "slice.item", "slice.user"]
    for suffix, count in counts.items():
        assert len(read_rows(folder / f"slice.{suffix}")) == count + 1


def test_headers(converted):
    folder, _ = converted
    assert read_rows(folder / "slice.inter")[0] == [
        "user_id:token", "item_id:token", "rating:float", "timestamp:float"
    ]
    assert read_rows(folder / "slice.item")[0] == [
        "item_id:token", "movie_title:token_seq", "release_year:token", "genre:token_seq"
    ]
    assert read_rows(folder / "slice.user")[0] == [
        "user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"
    ]


def test_inter_keeps_file_order(converted):
    folder, _ = converted
    expected = [line.split("::") for line in rating_lines()]
    assert read_rows(folder / "slice.inter")[1:] == expected


def test_item_title_year_and_genres(converted):
    folder, _ = converted
    items = {row[0]: row[1:] for row in read_rows(folder / "slice.item")[1:]}
    assert list(items) == MOVIE_IDS
    assert items["1"] == ["Toy Story", "1995", "Animation Children's Comedy"]
    assert items["3952"] == ["Contender, The", "2000", "Drama Thriller"]
    assert items["260"] == [
        "Star Wars: Episode IV - A New Hope", "1977", "Action Adventure Fantasy Sci-Fi"
    ]
    assert items["1176"][:2] == [
        "Double Life of Veronique, The (La Double Vie de Véronique)", "1991"
    ]
    # RecBole's quirk: the character before the last "(" is dropped, here a ")".
    assert items["1001"] == ["Associate, The (L'Associe", "1982", "Comedy"]


def test_latin1_input_becomes_utf8(converted):
    folder, _ = converted
    data = (folder / "slice.item").read_bytes()
    assert "Misérables, Les".encode("utf-8") in data
    assert "Misérables".encode("latin-1") not in data


def test_users_reordered_and_filtered(converted):
    folder, _ = converted
    users = read_rows(folder / "slice.user")[1:]
    assert [row[0] for row in users] == RATED_USERS
    # users.dat is UserID::Gender::Age::Occupation::Zip-code;
    # .user is id, age, gender, occupation, zip.
    assert users[0] == ["1", "18", "F", "1", "48001"]
    assert users[1] == ["2", "56", "M", "16", "70072-1234"]


def test_missing_file_error(tmp_path):
    raw = write_raw(tmp_path / "raw", ratings=False)
    with pytest.raises(FileNotFoundError) as info:
        convert_ml1m(raw, tmp_path / "out", "x")
    message = str(info.value)
    assert "ratings.dat" in message and "UserID::MovieID::Rating::Timestamp" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_malformed_line_error_leaves_no_partial_file(tmp_path):
    raw = write_raw(tmp_path / "raw")
    with open(raw / "movies.dat", "ab") as handle:
        handle.write(b"9999::No Genre Field (2000)\n")
    with pytest.raises(ValueError, match=r"movies\.dat:10: expected 3 fields"):
        convert_ml1m(raw, tmp_path / "out", "x")
    # The .inter finished before the failure; the broken .item was never published.
    assert sorted(p.name for p in (tmp_path / "out" / "x").iterdir()) == ["x.inter"]


def run_cli(*args):
    """Run the converter's CLI from the repository root."""
    # PYTHONPATH makes the package importable even before it is installed.
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
    return subprocess.run(
        [sys.executable, "-m", "recbole_llm.data.convert_ml1m", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def test_cli_converts_with_default_name(tmp_path):
    raw = write_raw(tmp_path / "ml-1m-slice")
    result = run_cli("--raw_dir", str(raw), "--out_dir", str(tmp_path / "datasets"))
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "datasets" / "ml-1m-slice"
    assert f"{N_RATINGS} interactions" in result.stdout and str(folder) in result.stdout
    assert len(read_rows(folder / "ml-1m-slice.user")) == len(RATED_USERS) + 1


def test_cli_missing_folder_exits_2(tmp_path):
    result = run_cli("--raw_dir", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "ratings.dat" in result.stderr


def test_cli_help():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "--raw_dir" in result.stdout and "default: datasets" in result.stdout
