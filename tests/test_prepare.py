"""
prepare.py and nanomoe/tokenizer.py, used the way a person would: `python prepare.py ...` in a scratch folder,
then assertions on the files it leaves, its exit code and its one-line errors. The CLI contract (exit 2, one
'error:' line, old files untouched) runs as a real subprocess once; the rest call main() in this process to
stay fast. Offline: downloads go to a local HTTP server, GPT-2 BPE comes from TIKTOKEN_CACHE_DIR (skipped
without it).
"""
import errno
import hashlib
import http.server
import json
import os
import threading

import numpy as np
import pytest

from conftest import assert_user_error, generated_text, needs_gpt2, run, run_script
from nanomoe.errors import UserError
from nanomoe.tokenizer import Tokenizer, load_meta, prepare_command, token_dtype, write_meta


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every prepare.py run here, in-process or a subprocess (conftest.run passes os.environ on), reaches the
    local test server without a proxy: never the network."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def prepare_here(tmp_path, monkeypatch, capsys):
    """prepare.py's main() run in this process from tmp_path, for the success paths that check files and
    numbers, seconds faster a run than a subprocess. Download backoff sleeps are recorded instead of slept."""
    import prepare as prep
    monkeypatch.chdir(tmp_path)
    sleeps = []
    monkeypatch.setattr(prep.time, "sleep", sleeps.append)

    def run(*args):
        prep.main([str(a) for a in args])
        return capsys.readouterr()
    run.sleeps = sleeps
    return run


def read_dataset(data_dir):
    """(meta, train ids, val ids) as train.py would read them."""
    meta = load_meta(data_dir)
    train = np.fromfile(data_dir / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(data_dir / "val.bin", dtype=meta["dtype"])
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    return meta, train, val


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in files_under(folder)}


@pytest.fixture
def server():
    """A local HTTP server. routes maps a path to (status, body, Content-Length to announce), or to a list
    of those answered in turn (the last one repeats)."""
    routes = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            answer = routes.get(self.path, (404, b"not found", None))
            if isinstance(answer, list):
                answer = answer.pop(0) if len(answer) > 1 else answer[0]
            status, body, length = answer
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            self.wfile.write(body)  # HTTP/1.0: the connection closes after this, short body or not

        def log_message(self, *args):  # keep pytest's output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", routes
    httpd.shutdown()
    httpd.server_close()


# -----------------------------------------------------------------------------
# shakespeare_char / shakespeare

def test_shakespeare_char_from_input(tmp_path):
    text = generated_text(200_000)
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    r = run(["prepare.py", "shakespeare_char", "--input", "input.txt"], tmp_path)  # a real process, as typed
    vocab = len(set(text))
    assert f"vocab {vocab}" in r.stdout
    meta, train, val = read_dataset(tmp_path / "data" / "shakespeare_char")
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == vocab and meta["dtype"] == "uint16"
    assert meta["chars"] == "".join(sorted(set(text)))  # ids in code point order, like nanoGPT
    assert train.dtype == np.uint16 and len(train) + len(val) == 200_000
    n = int(len(text) * 0.9)  # nanoGPT's cut: the first 90% of the characters is train
    assert len(train) == n
    tok = Tokenizer.from_meta(meta)
    assert tok.decode(val) == text[n:]
    assert tok.encode(text[n:]) == val.tolist()
    assert files_under(tmp_path / "data") == ["shakespeare_char/meta.json", "shakespeare_char/train.bin",
                                             "shakespeare_char/val.bin"]


@needs_gpt2
def test_shakespeare_gpt2_reuses_char_input(tmp_path, prepare_here, monkeypatch):
    import prepare as prep
    monkeypatch.setattr(prep, "PIECE_CHARS", 10_000)  # the one file is tokenized in ~30 pieces
    # data/shakespeare_char/input.txt already there: shakespeare must use it, not download (the URL is dead)
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    text = generated_text(300_000)
    (tmp_path / "data" / "shakespeare_char" / "input.txt").write_text(text, encoding="utf-8")
    out = prepare_here("shakespeare", "--url", "http://127.0.0.1:9/input.txt", "--retries", 0, "--progress")
    assert "using data/shakespeare_char/input.txt" in out.out
    assert "tokenizing: 100%" in out.err
    meta, train, val = read_dataset(tmp_path / "data" / "shakespeare")
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert "chars" not in meta
    tok = Tokenizer.from_meta(meta)
    assert np.concatenate([train, val]).tolist() == tok.encode(text)  # the pieces' ids are the whole text's
    assert tok.decode(np.concatenate([train, val])) == text
    assert len(train) == int((len(train) + len(val)) * 0.9)


def test_download(tmp_path, server, prepare_here):
    url, routes = server
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    routes["/input.txt"] = (200, text.encode(), None)
    prepare_here("shakespeare_char", "--url", url + "/input.txt", "--retries", 0)
    out = tmp_path / "data" / "shakespeare_char"
    assert (out / "input.txt").read_text() == text
    meta, train, val = read_dataset(out)
    assert meta["source"] == url + "/input.txt"
    assert Tokenizer.from_meta(meta).decode(np.concatenate([train, val])) == text
    assert files_under(out) == ["input.txt", "meta.json", "train.bin", "val.bin"]  # no temp files left


def test_download_http_error(tmp_path, server):
    url, _ = server
    r = run_script(["prepare.py", "shakespeare_char", "--url", url + "/missing.txt", "--retries", 0], tmp_path)
    assert_user_error(r, "could not download", "404", "--input")
    assert not (tmp_path / "data").exists()  # no empty dataset folder left behind


def test_an_already_prepared_dataset_is_a_quick_no_op_offline(tmp_path, server, prepare_here):
    """`prepare.py shakespeare_char` again, offline and without its input.txt: nothing to do, no download."""
    url, routes = server
    routes["/input.txt"] = (200, ("ROMEO: hello there\n" * 50).encode(), None)
    prepare_here("shakespeare_char", "--url", url + "/input.txt", "--retries", 0)
    out = tmp_path / "data" / "shakespeare_char"
    (out / "input.txt").unlink()
    before = digest(out)
    routes.clear()  # offline from here: any request would get a 404 and fail
    printed = prepare_here("shakespeare_char", "--url", url + "/input.txt", "--retries", 0)
    assert "already prepared" in printed.out and "downloading" not in printed.out
    assert digest(out) == before
    # a damaged dataset (a .bin of the wrong size) is not "prepared": it goes to the network, which fails
    (out / "val.bin").write_bytes(b"12")
    r = run_script(["prepare.py", "shakespeare_char", "--url", url + "/input.txt", "--retries", 0], tmp_path)
    assert_user_error(r, "could not download")


def test_download_truncated_keeps_old_files(tmp_path, server):
    url, routes = server
    routes["/input.txt"] = (200, b"To be, or not to be" * 10, 100_000)  # announces 100 kB, sends 190 bytes
    out = tmp_path / "data" / "shakespeare_char"
    out.mkdir(parents=True)
    for name in ("train.bin", "val.bin", "meta.json"):  # a previous run's output, without its input.txt
        (out / name).write_bytes(os.urandom(64))
    before = digest(out)
    r = run_script(["prepare.py", "shakespeare_char", "--url", url + "/input.txt", "--retries", 0], tmp_path)
    assert_user_error(r, "truncated")
    assert digest(out) == before  # same files, same bytes: no input.txt, no temp file, nothing rewritten


def test_download_retries_then_succeeds(tmp_path, server, prepare_here):
    url, routes = server
    text = "Now is the winter of our discontent\n" * 10
    routes["/input.txt"] = [(503, b"busy", None), (200, text.encode(), None)]  # a retry gets the file
    out = prepare_here("shakespeare_char", "--url", url + "/input.txt", "--retries", 3)
    assert "HTTP 503" in out.err and "retrying in 1s" in out.err
    assert prepare_here.sleeps == [1]  # one backoff, then success: no further tries
    assert (tmp_path / "data" / "shakespeare_char" / "input.txt").read_text() == text


# -----------------------------------------------------------------------------
# your own text

def test_folder_input_skips_binary_and_hidden(tmp_path, prepare_here):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / "a.txt").write_text("hello world\n")
    (corpus / "sub" / "b.py").write_text("print('hi')\n")
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")  # NUL bytes: binary
    (corpus / "latin1.txt").write_bytes("café".encode("latin-1"))  # not UTF-8
    (corpus / ".git" / "config").write_text("[core]\n\tbare = false\n")  # hidden folder: skipped
    (corpus / ".notes").write_text("hidden file ~~~\n")
    # a named pipe would block the read forever; a link out of the folder would read anything on the machine
    os.mkfifo(corpus / "pipe.txt")
    (tmp_path / "secret.txt").write_text("outside {{{\n")
    (corpus / "link.txt").symlink_to(tmp_path / "secret.txt")
    (corpus / "inside.txt").symlink_to(corpus / "a.txt")  # a link that stays inside is read
    out = prepare_here("text", "--input", corpus, "--val_fraction", 0.2)
    assert "read 3 text files" in out.out and "skipped 2" in out.out
    meta, train, val = read_dataset(tmp_path / "data" / "corpus")
    # files in sorted path order, one newline between two files
    assert Tokenizer.from_meta(meta).decode(np.concatenate([train, val])) == \
        "hello world\n\nhello world\n\nprint('hi')\n"
    assert "~" not in meta["chars"] and "[" not in meta["chars"] and "{" not in meta["chars"]
    assert meta["source"] == str(corpus)


def test_folder_glob_exclude_and_max_chars(tmp_path, prepare_here):
    # the study's second corpus: a source tree's *.py files, without site-packages, capped in size
    corpus = tmp_path / "lib"
    (corpus / "site-packages" / "pkg").mkdir(parents=True)
    (corpus / "json").mkdir()
    (corpus / "abc.py").write_text("class ABC: pass\n")
    (corpus / "json" / "decoder.py").write_text("def decode(s):\n    return s\n")
    (corpus / "json" / "README.txt").write_text("not python\n")
    (corpus / "site-packages" / "pkg" / "mod.py").write_text("import everything\n")
    out = prepare_here("text", "--input", corpus, "--name", "src", "--glob", "*.py", "--exclude", "site-packages",
                       "--val_fraction", 0.2)
    assert "read 2 text files" in out.out
    meta, train, val = read_dataset(tmp_path / "data" / "src")
    assert Tokenizer.from_meta(meta).decode(np.concatenate([train, val])) == \
        "class ABC: pass\n\ndef decode(s):\n    return s\n"
    # --max_chars keeps the first characters in path order, cutting the last file read
    prepare_here("text", "--input", corpus, "--name", "capped", "--glob", "*.py", "--glob", "*.txt",
                 "--exclude", "site-packages", "--max_chars", 20, "--val_fraction", 0.2)
    meta, train, val = read_dataset(tmp_path / "data" / "capped")
    text = Tokenizer.from_meta(meta).decode(np.concatenate([train, val]))
    assert text == "class ABC: pass\n\nnot "  # 16 + 4 characters (separators do not count)


def test_uint32_for_big_char_vocab(tmp_path, prepare_here):
    assert token_dtype(65) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(70000) == np.uint32
    assert token_dtype(50257) == np.uint16
    # 70,000 distinct characters (code points from 0x100, leaving out the surrogates UTF-8 can't hold)
    chars = [chr(c) for c in range(0x100, 0x100 + 72_100) if not 0xD800 <= c <= 0xDFFF][:70_000]
    text = "".join(chars) * 2
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    prepare_here("text", "--input", "wide.txt", "--name", "wide", "--val_fraction", 0.5)
    meta, train, val = read_dataset(tmp_path / "data" / "wide")
    assert meta["vocab_size"] == 70_000 and meta["dtype"] == "uint32" and train.dtype == np.uint32
    assert (tmp_path / "data" / "wide" / "train.bin").stat().st_size == 4 * len(train)
    assert train.max() == 69_999
    assert Tokenizer.from_meta(meta).decode(val) == "".join(chars)


def test_failed_run_keeps_old_files(tmp_path, prepare_here, monkeypatch):
    (tmp_path / "notes.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 5)
    prepare_here("text", "--input", "notes.txt")
    out = tmp_path / "data" / "notes"
    before = digest(out)
    assert set(before) == {"meta.json", "train.bin", "val.bin"}
    r = run_script(["prepare.py", "text", "--input", "nowhere/notes.txt", "--name", "notes"], tmp_path)
    assert_user_error(r, "nowhere/notes.txt")
    assert digest(out) == before
    # the same text again changes nothing and needs no --force
    prepare_here("text", "--input", "notes.txt")
    assert digest(out) == before
    # another text is refused without --force, the old dataset untouched
    (tmp_path / "notes.txt").write_text("a different text entirely\n" * 5)
    r = run_script(["prepare.py", "text", "--input", "notes.txt"], tmp_path)
    assert_user_error(r, "already holds a different dataset", "--force")
    assert digest(out) == before
    # the disk fills up while the new files are written: the old ones stay, no temp file is left behind
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match="disk is full.*data/notes"):
        prepare_here("text", "--input", "notes.txt", "--force")
    assert digest(out) == before
    with pytest.raises(UserError, match="disk is full"):  # a new dataset: not even its folder stays
        prepare_here("text", "--input", "notes.txt", "--name", "other")
    assert sorted(os.listdir(tmp_path / "data")) == ["notes"]
    # with --force and room on the disk, the new dataset replaces the old one, nothing else left beside it
    monkeypatch.setattr(os, "fsync", real_fsync)
    prepare_here("text", "--input", "notes.txt", "--force")
    assert digest(out) != before and set(digest(out)) == {"meta.json", "train.bin", "val.bin"}


TEXT = "Le cœur a ses raisons que la raison ne connaît point; café, naïve, Æsop.\n" * 20


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "cp1252"])
def test_text_in_another_encoding_is_one_line_and_reads_with_encoding(tmp_path, prepare_here, encoding):
    (tmp_path / "notes.txt").write_bytes(TEXT.replace("œ", "oe").encode(encoding))
    r = run_script(["prepare.py", "text", "--input", "notes.txt"], tmp_path)
    assert_user_error(r, "notes.txt is not utf-8 text", "--encoding")
    assert not (tmp_path / "data").exists()
    prepare_here("text", "--input", "notes.txt", "--encoding", encoding)
    meta, train, val = read_dataset(tmp_path / "data" / "notes")
    assert Tokenizer.from_meta(meta).decode(np.concatenate([train, val])) == TEXT.replace("œ", "oe")


@pytest.mark.parametrize("content, words", [(bytes(range(256)) * 4, ["is not utf-8 text"]),
                                            (b"\xff\xfe" + b"\x00\xd8" * 8, ["is not utf-16 text"])],
                         ids=["binary", "utf-16-lone-surrogates"])
def test_binary_or_undecodable_input_is_one_line(tmp_path, content, words):
    (tmp_path / "blob.txt").write_bytes(content)
    encoding = "utf-16" if "utf-16" in words[0] else "utf-8"
    r = run_script(["prepare.py", "text", "--input", "blob.txt", "--encoding", encoding], tmp_path)
    assert_user_error(r, *words)
    r = run_script(["prepare.py", "text", "--input", "blob.txt", "--encoding", "klingon"], tmp_path)
    assert_user_error(r, "--encoding 'klingon'")
    assert not (tmp_path / "data").exists()


# -----------------------------------------------------------------------------
# argument checks and the tokenizer API, in-process

def test_bad_arguments(tmp_path):
    import prepare as prep
    (tmp_path / "tiny.txt").write_text("a")
    with pytest.raises(UserError, match="val_fraction"):
        prep.main(["shakespeare_char", "--val_fraction", "1.5"])
    with pytest.raises(UserError, match="--input"):
        prep.main(["text"])
    with pytest.raises(UserError, match="invalid choice"):
        prep.main(["wikipedia"])
    with pytest.raises(UserError, match="only for the text dataset"):
        prep.main(["shakespeare_char", "--tokenizer", "gpt2"])
    with pytest.raises(UserError, match="--glob is only for the text dataset"):
        prep.main(["shakespeare_char", "--glob", "*.py"])
    with pytest.raises(UserError, match="--max_chars must be at least 1"):
        prep.main(["text", "--input", str(tmp_path / "tiny.txt"), "--max_chars", "0"])
    with pytest.raises(UserError, match="too short"):  # 1 token: 90% of it leaves train empty
        prep.main(["text", "--input", str(tmp_path / "tiny.txt"), "--data_root", str(tmp_path / "data")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no text"):
        prep.main(["text", "--input", str(tmp_path / "empty.txt"), "--data_root", str(tmp_path / "data")])
    assert files_under(tmp_path / "data") == []


def test_load_meta_missing(tmp_path):
    with pytest.raises(UserError, match=r"python prepare\.py shakespeare_char"):
        load_meta(tmp_path / "data" / "shakespeare_char")
    with pytest.raises(UserError, match=r"python prepare\.py text --input PATH --name mybooks"):
        load_meta(tmp_path / "data" / "mybooks")
    assert prepare_command("shakespeare") == "python prepare.py shakespeare"
    assert prepare_command("x", "elsewhere") == "python prepare.py text --input PATH --name x --data_root elsewhere"


def test_meta_round_trip_and_broken_meta(tmp_path):
    meta = {**Tokenizer("char", "\n abc").meta(), "train_tokens": 9, "val_tokens": 1, "source": "x.txt"}
    write_meta(tmp_path, meta)
    assert load_meta(tmp_path) == meta
    assert os.listdir(tmp_path) == ["meta.json"]
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="prepare"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "vocab_size": 6}))
    with pytest.raises(UserError, match="vocab_size"):
        load_meta(tmp_path)


def test_char_tokenizer():
    tok = Tokenizer("char", "\n !abc")
    assert tok.kind == "char" and tok.vocab_size == 6
    assert tok.decode(tok.encode("abc cab!\n")) == "abc cab!\n"
    with pytest.raises(UserError, match=r"'z'.*'é'|'é'.*'z'") as e:
        tok.encode("abz é")
    assert "training data" in str(e.value)
    assert tok.decode([3, 6, 4]) == "a\ufffdb"  # an id past the vocabulary (a padded model row) shows as U+FFFD


@needs_gpt2
def test_gpt2_tokenizer_round_trip():
    tok = Tokenizer("gpt2")
    assert tok.kind == "gpt2" and tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    text = "To be, or not to be — naïve café 🙂\n<|endoftext|>Next document"
    ids = tok.encode(text)
    assert 50256 in ids  # the literal end-of-text marker becomes GPT-2's special token
    assert tok.decode(ids) == text
    assert tok.decode([15496, 50300, 995]) == "Hello\ufffd world"  # 50257..50303: GPT-2's padded rows
    assert Tokenizer.from_meta(tok.meta()).vocab_size == 50257 and tok.meta()["dtype"] == "uint16"


def test_progress_for_a_folder(tmp_path, prepare_here):
    corpus = tmp_path / "src"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"f{i}.py").write_text(f"x = {i}\n")
    quiet = prepare_here("text", "--input", corpus)
    assert "files:" not in quiet.err  # not a terminal: no progress line in logs
    shown = prepare_here("text", "--input", corpus, "--name", "src2", "--progress")
    assert "reading files: 3/3" in shown.err and "tokenizing files: 3/3" in shown.err
