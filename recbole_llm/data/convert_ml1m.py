"""Convert the GroupLens MovieLens-1M raw files into RecBole atomic files.

Reads ``ratings.dat``, ``movies.dat`` and ``users.dat`` (``::``-separated,
latin-1) and writes ``<name>.inter``, ``<name>.item`` and ``<name>.user``
(tab-separated, UTF-8) into ``<out_dir>/<name>/``, byte-identical to the
ml-1m atomic files RecBole publishes when the raw files are complete.

Usage::

    python -m recbole_llm.data.convert_ml1m --raw_dir DIR [--out_dir datasets] [--name NAME]
"""

import argparse
import re
import sys
import time
from pathlib import Path

from recbole_llm.utils import atomic_target

RAW_ENCODING = "latin-1"

# Raw file name -> (field count, field layout), used for validation and errors.
RAW_FILES = {
    "ratings.dat": (4, "UserID::MovieID::Rating::Timestamp"),
    "movies.dat": (3, "MovieID::Title::Genres"),
    "users.dat": (5, "UserID::Gender::Age::Occupation::Zip-code"),
}

INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
ITEM_HEADER = ["item_id:token", "movie_title:token_seq", "release_year:token", "genre:token_seq"]
USER_HEADER = ["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"]

# RecBole strips one separator character plus the last "(...)" group, so
# "Associate, The (L'Associe)(1982)" loses its ")" and becomes
# "Associate, The (L'Associe"; reproducing this keeps the files byte-identical.
TITLE_YEAR = re.compile(r"^(?P<title>.*).\((?P<year>[^()]*)\)$")


def read_dat(path):
    """Yield the ``::``-separated fields of each non-empty line of a raw file.

    Raises ValueError naming the file and line when the field count is wrong.
    """
    expected, layout = RAW_FILES[path.name]
    with open(path, encoding=RAW_ENCODING, newline="") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("::")
            if len(fields) != expected:
                raise ValueError(
                    f"{path}:{line_no}: expected {expected} fields ({layout}), got {len(fields)}"
                )
            yield fields


def split_title(raw_title):
    """Split a raw movie title such as ``Toy Story (1995)`` into (title, year)."""
    match = TITLE_YEAR.match(raw_title)
    if match is None:
        raise ValueError(f"movie title without a trailing '(year)': {raw_title!r}")
    return match.group("title"), match.group("year")


def write_atomic(path, header, rows):
    """Write a tab-separated UTF-8 file with a header, replacing ``path`` atomically.

    Returns the number of data rows written. The temporary file lives in the
    same folder so ``os.replace`` stays a rename on one file system; readers
    never see a half-written file.
    """
    count = 0
    with atomic_target(path) as temporary, open(temporary, "x", encoding="utf-8", newline="\n") as handle:
        handle.write("\t".join(header) + "\n")
        for row in rows:
            handle.write("\t".join(row) + "\n")
            count += 1
    return count


def inter_rows(ratings_path, rated_users):
    """Yield .inter rows in file order, recording every rating user in ``rated_users``."""
    for user_id, item_id, rating, timestamp in read_dat(ratings_path):
        rated_users.add(user_id)
        yield [user_id, item_id, rating, timestamp]


def item_rows(movies_path):
    """Yield .item rows for every movie, with the title split from its year."""
    for item_id, raw_title, genres in read_dat(movies_path):
        title, year = split_title(raw_title)
        yield [item_id, title, year, genres.replace("|", " ")]


def user_rows(users_path, rated_users):
    """Yield .user rows, reordered to RecBole's columns, for users who rated something."""
    for user_id, gender, age, occupation, zip_code in read_dat(users_path):
        if user_id in rated_users:
            yield [user_id, age, gender, occupation, zip_code]


def check_raw_files(raw_dir):
    """Return the raw file paths, raising FileNotFoundError before any output is written."""
    paths = {}
    for file_name, (_, layout) in RAW_FILES.items():
        path = raw_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"missing {path}: expected the MovieLens-1M file {file_name} "
                f"({layout}, '::'-separated, latin-1)"
            )
        paths[file_name] = path
    return paths


def convert_ml1m(raw_dir, out_dir, name):
    """Convert MovieLens-1M raw files in ``raw_dir`` to ``<out_dir>/<name>/<name>.*``.

    Returns the data row counts as ``{"inter": ..., "item": ..., "user": ...}``.
    """
    paths = check_raw_files(Path(raw_dir))
    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)

    # The inter pass comes first because it decides which users are kept.
    rated_users = set()
    return {
        "inter": write_atomic(
            target / f"{name}.inter", INTER_HEADER, inter_rows(paths["ratings.dat"], rated_users)
        ),
        "item": write_atomic(target / f"{name}.item", ITEM_HEADER, item_rows(paths["movies.dat"])),
        "user": write_atomic(
            target / f"{name}.user", USER_HEADER, user_rows(paths["users.dat"], rated_users)
        ),
    }


def parse_args(argv=None):
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m recbole_llm.data.convert_ml1m",
        description=(
            "Convert MovieLens-1M raw files (ratings.dat, movies.dat, users.dat) into "
            "RecBole atomic files <out_dir>/<name>/<name>.{inter,item,user}."
        ),
    )
    parser.add_argument(
        "--raw_dir", required=True, help="folder holding ratings.dat, movies.dat and users.dat"
    )
    parser.add_argument(
        "--out_dir",
        default="datasets",
        help="parent folder of the dataset folder (default: datasets)",
    )
    parser.add_argument(
        "--name",
        help="dataset name, used for the folder and file names (default: raw_dir's basename)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Run the conversion from the command line; exit with status 2 on bad input."""
    args = parse_args(argv)
    name = args.name or Path(args.raw_dir).resolve().name
    start = time.perf_counter()
    try:
        counts = convert_ml1m(args.raw_dir, args.out_dir, name)
    except (FileNotFoundError, ValueError) as exc:
        print(f"convert_ml1m: error: {exc}", file=sys.stderr)
        sys.exit(2)
    elapsed = time.perf_counter() - start
    print(
        f"{name}: {counts['inter']} interactions, {counts['item']} items, "
        f"{counts['user']} users -> {Path(args.out_dir) / name} ({elapsed:.1f} s)"
    )


if __name__ == "__main__":
    main()
