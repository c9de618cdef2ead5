"""Wrap Python lines longer than 100 columns in the project's style, for `ruff check` (E501).

    python3 scripts/wrap_long_lines.py [--since REV] FILE...

Each long line is broken after a comma or before an operator inside its brackets (aligned
to the open bracket), a long string literal is split at a space into an implicit
concatenation (reflowed into the next line's literal), a trailing comment moves above its
line, a whole statement at bracket depth 0 gets parentheses; then the bracket groups the
wrapping touched (lines changed since REV, default HEAD) are repacked greedily where that
saves lines. Every change is kept only if the file's AST stays the same (docstring
whitespace aside), so the code means what it meant. Lines it cannot wrap are printed; wrap
those by hand. Made for the move from 120 to 100 columns: run it over files merged in with
longer lines, then check the diff by eye.
"""
import ast
import difflib
import io
import re
import subprocess
import sys
import tokenize

LIMIT = 100


def norm_ast(src):
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body[0].value.value = " ".join(body[0].value.value.split())
    return ast.dump(tree)


def tokens(src):
    return list(tokenize.generate_tokens(io.StringIO(src).readline))


OPEN, CLOSE = "([{", ")]}"
BREAK_BEFORE_WORDS = ("and", "or", "if", "else", "for")
BREAK_BEFORE_OPS = ("+", "-", "*", "/", "//", "%", "|", "&", "@")


def analyse(src):
    """Per token: (token, stack of open-bracket tokens before it)."""
    toks = tokens(src)
    stack, out = [], []
    for i, t in enumerate(toks):
        out.append((i, t, list(stack)))
        if t.type == tokenize.OP and t.string in OPEN:
            stack.append(i)
        elif t.type == tokenize.OP and t.string in CLOSE:
            stack.pop()
    return toks, out


def cont_col(toks, open_idx):
    """Column where a continuation inside the bracket toks[open_idx] starts."""
    t = toks[open_idx]
    nxt = toks[open_idx + 1]
    if nxt.type in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
        # hanging indent: the first token on a following line
        j = open_idx + 1
        while toks[j].type in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            j += 1
        return toks[j].start[1]
    return t.end[1]


def split_string(s, maxlen):
    """Split a string token's text (one line) at a space so the first part
    (with its closing quote) is at most maxlen long. Returns (a, b) or None."""
    m = re.match(r"^([rRbBuUfF]*)('''|\"\"\"|'|\")", s)
    if not m:
        return None
    prefix, quote = m.group(1), m.group(2)
    if len(quote) == 3:
        return None
    body = s[len(prefix) + 1:-1]
    is_f = "f" in prefix.lower()
    # positions in body where a split is allowed: after a space, outside {...}
    depth, i, best = 0, 0, None
    while i < len(body):
        c = body[i]
        if is_f and c == "{":
            if body[i:i + 2] == "{{" and depth == 0:
                i += 2
                continue
            depth += 1
        elif is_f and c == "}":
            if body[i:i + 2] == "}}" and depth == 0:
                i += 2
                continue
            depth -= 1
        elif c == "\\":
            i += 2
            continue
        elif c == " " and depth == 0:
            first_len = len(prefix) + 1 + (i + 1) + 1
            if first_len <= maxlen and i + 1 < len(body):
                best = i + 1
        i += 1
    if best is None:
        return None
    a, b = body[:best], body[best:]

    def pre(part):
        if is_f and not re.search(r"(?<!\{)\{(?!\{)", part.replace("{{", "")):
            return prefix.replace("f", "").replace("F", "")
        return prefix
    return f"{pre(a)}{quote}{a}{quote}", f"{pre(b)}{quote}{b}{quote}"


def merge_strings(b, after, nxt, col):
    """Join the split-off string piece ``b`` with the string that starts the next
    line (an implicit concatenation), when nothing follows ``b`` on its line and
    both have the same prefix and quotes: a reflow. The line may come out long
    again; the next pass splits it at a space."""
    if after.strip() or not nxt.strip():
        return None
    mb = re.match(r"^([rRbBuUfF]*)(['\"])", b)
    mn = re.match(r"^([rRbBuUfF]*)(['\"])", nxt.lstrip())
    if not mb or not mn:
        return None
    try:
        tok = next(tokenize.generate_tokens(io.StringIO(nxt.lstrip()).readline))
    except (tokenize.TokenError, SyntaxError, StopIteration):
        return None
    if tok.type != tokenize.STRING or tok.end[0] != 1:
        return None
    pb, pn = mb.group(1).lower(), mn.group(1).lower()
    if mb.group(2) != mn.group(2) or set(pb) - {"f"} != set(pn) - {"f"}:
        return None
    body_b, body_n = b[len(pb) + 1:-1], tok.string[len(pn) + 1:-1]
    if ("f" in pb) != ("f" in pn):  # make both f-strings: escape the plain one's braces
        if "f" in pb:
            body_n = body_n.replace("{", "{{").replace("}", "}}")
        else:
            body_b = body_b.replace("{", "{{").replace("}", "}}")
        pb = pb if "f" in pb else pb + "f"
    else:
        pb = mb.group(1)
    q = mb.group(2)
    return " " * col + f"{pb}{q}{body_b}{body_n}{q}" + nxt.lstrip()[tok.end[1]:]


def wrap_once(src, skip):
    lines = src.split("\n")
    toks, info = analyse(src)
    match, stack = {}, []
    for i, t in enumerate(toks):
        if t.type == tokenize.OP and t.string in OPEN:
            stack.append(i)
        elif t.type == tokenize.OP and t.string in CLOSE:
            match[stack.pop()] = i
    for ln, line in enumerate(lines, 1):
        if len(line) <= LIMIT or ln in skip:
            continue
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        # a whole-line comment
        if stripped.startswith("#"):
            cut = line.rfind(" ", indent + 2, LIMIT + 1)
            if cut > indent + 2:
                new = [line[:cut], " " * indent + "# " + line[cut + 1:]]
                return "\n".join(lines[:ln - 1] + new + lines[ln:]), ln
            skip.add(ln)
            continue
        # inside a multi-line string (docstring): wrap the text
        ms = [t for _, t, _ in info if t.type == tokenize.STRING and t.start[0] < ln <= t.end[0]]
        if ms and "  #" in line:
            skip.add(ln)
            continue
        if ms:
            cut = line.rfind(" ", indent + 1, LIMIT + 1)
            if cut > indent:
                new = [line[:cut], " " * indent + line[cut + 1:]]
                return "\n".join(lines[:ln - 1] + new + lines[ln:]), ln
            skip.add(ln)
            continue
        comments = [t for _, t, _ in info if t.type == tokenize.COMMENT and t.start[0] == ln]
        if comments:
            c = comments[0]
            code = line[:c.start[1]].rstrip()
            text = c.string
            if text.startswith(("# noqa", "# type:", "# isort")):
                skip.add(ln)
                continue
            if len(code) + 2 + len(text) <= LIMIT:  # tighten an aligned comment
                new = [code + "  " + text]
            elif len(code) <= LIMIT:  # move the comment above its line
                new = [" " * indent + text, code]
            else:
                skip.add(ln)
                continue
            return "\n".join(lines[:ln - 1] + new + lines[ln:]), ln
        layout_types = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        on_line = [(i, t, st) for i, t, st in info if t.start[0] == ln and t.end[0] == ln
                   and t.type not in layout_types]
        # a string literal that crosses the limit, inside brackets: split it (reflow)
        for i, t, st in on_line:
            if t.type == tokenize.STRING and st and t.end[1] > LIMIT and t.start[1] < LIMIT - 10 \
                    and t.start[1] - indent <= 20:
                parts = split_string(t.string, LIMIT - t.start[1])
                if parts:
                    a, b = parts
                    new = [line[:t.start[1]] + a, " " * t.start[1] + b + line[t.end[1]:]]
                    rest = lines[ln:]
                    merged = merge_strings(b, line[t.end[1]:], rest[0] if rest else "", t.start[1])
                    if merged is not None:
                        new[1] = merged
                        rest = rest[1:]
                    return "\n".join(lines[:ln - 1] + new + rest), ln
        cands = []
        for k, (i, t, st) in enumerate(on_line):
            if not st:
                continue
            nxt = toks[i + 1]
            if nxt.start[0] != ln or nxt.type == tokenize.COMMENT:
                continue
            col = cont_col(toks, st[-1])
            opener = toks[st[-1]]
            closer = match.get(st[-1])
            if opener.start[0] == ln and closer is not None and toks[closer].start[0] == ln \
                    and toks[closer].end[1] - opener.start[1] < 40:
                continue
            if t.type == tokenize.OP and t.string == "," and t.end[1] <= LIMIT:
                if nxt.type == tokenize.OP and nxt.string in CLOSE:
                    continue
                cands.append((len(st), t.end[1], nxt.start[1], col))
            elif (t.type == tokenize.NAME and t.string in BREAK_BEFORE_WORDS
                  or t.type == tokenize.OP and t.string in BREAK_BEFORE_OPS) \
                    and t.start[1] <= LIMIT and k > 0:
                prev = on_line[k - 1][1]
                if prev.type == tokenize.OP and prev.string in OPEN + ",=":
                    continue  # unary
                if t.string in ("if", "else", "for") and not st:
                    continue
                cands.append((len(st) + 0.5, prev.end[1], t.start[1], col))
        good = [c for c in cands if c[3] + (len(line) - c[2]) < len(line)]
        if good:
            # the outermost level that leaves both parts shortest; prefer breaks after commas
            depth = min(c[0] for c in good)
            best = max((c for c in good if c[0] == depth), key=lambda c: c[1])
            _, end, start, col = best
            new = [line[:end].rstrip(), " " * col + line[start:]]
            rest = lines[ln:]
            if rest and new[1].rstrip().endswith(",") and "#" not in new[1]:
                nxt_line = rest[0]
                nxt_indent = len(nxt_line) - len(nxt_line.lstrip())
                joined = new[1].rstrip() + " " + nxt_line.strip()
                if nxt_indent == col and len(joined) <= LIMIT:
                    new[1] = joined
                    rest = rest[1:]
            return "\n".join(lines[:ln - 1] + new + rest), ln
        # a whole statement on this line at bracket depth 0: parenthesize the part to wrap
        first = on_line[0] if on_line else None
        starts = (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT)
        whole = first is not None and toks[on_line[-1][0] + 1].type == tokenize.NEWLINE \
            or on_line and on_line[-1][1].string == ":"
        if first is not None and not first[2] and toks[first[0] - 1].type in starts and whole:
            body = [x for x in on_line if not x[2]]
            start = end = None
            if first[1].string in ("return", "assert", "yield", "if", "elif", "while"):
                start = on_line[1][1].start[1] if len(on_line) > 1 else None
                end = len(line.rstrip())
                if first[1].string == "assert":
                    commas = [x for x in body if x[1].string == ","]
                    if commas:
                        end = commas[0][1].start[1]
                if on_line[-1][1].string == ":":
                    end = on_line[-1][1].start[1]
            else:
                eq = [x for x in body
                      if x[1].type == tokenize.OP and x[1].string in ("=", "+=", "-=")]
                if eq:
                    start = toks[eq[0][0] + 1].start[1]
                    end = len(line.rstrip())
            opening = next((i for i, t, _ in on_line if t.start[1] == start), None)
            closing = next((i for i, t, _ in on_line if t.end[1] == end), None)
            parenthesized = start is not None and line[start] == "(" and opening is not None \
                and match.get(opening) == closing
            if start is not None and end is not None and end > start and not parenthesized:
                new = [line[:start] + "(" + line[start:end].rstrip() + ")" + line[end:]]
                return "\n".join(lines[:ln - 1] + new + lines[ln:]), ln
        skip.add(ln)
    return None, None


def process(path):
    src = open(path).read()
    want = norm_ast(src)
    skip = set()
    cur = src
    for _ in range(5000):
        new, ln = wrap_once(cur, skip)
        if new is None:
            break
        try:
            ok = norm_ast(new) == want
        except SyntaxError:
            ok = False
        if ok:
            cur = new
        else:
            skip.add(ln)
    left = [i for i, text in enumerate(cur.split("\n"), 1) if len(text) > LIMIT]
    if cur != src:
        open(path, "w").write(cur)
    return left


def wrap_main(paths):
    total = 0
    for p in paths:
        left = process(p)
        total += len(left)
        for ln in left:
            print(f"{p}:{ln}")
    print("left:", total, file=sys.stderr)
    return total


def changed_lines(path, since):
    old = subprocess.check_output(["git", "show", f"{since}:{path}"], text=True).split("\n")
    new = open(path).read().split("\n")
    out = set()
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, _, _, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            out.update(range(j1 + 1, j2 + 1))
    return out

def _groups(src):
    toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    stack, res = [], []
    for i, t in enumerate(toks):
        if t.type == tokenize.OP and t.string in "([{":
            stack.append(i)
        elif t.type == tokenize.OP and t.string in ")]}":
            o = stack.pop()
            res.append((o, i))
    return toks, res

def _repack_group(src, toks, o, c):
    lines = src.split("\n")
    op, cl = toks[o], toks[c]
    if op.start[0] == cl.start[0] or toks[o + 1].type in (tokenize.NL, tokenize.COMMENT):
        return None
    depth, items, cur_start = 0, [], o + 1
    for k in range(o + 1, c):
        t = toks[k]
        if t.type == tokenize.COMMENT:
            return None
        if t.type == tokenize.OP and t.string in "([{":
            depth += 1
        elif t.type == tokenize.OP and t.string in ")]}":
            depth -= 1
        elif t.type == tokenize.NL:
            prev = toks[k - 1]
            if not (depth == 0 and prev.type == tokenize.OP and prev.string == ","):
                return None
        elif t.type == tokenize.STRING and t.start[0] != t.end[0]:
            return None
        if depth == 0 and t.type == tokenize.OP and t.string == ",":
            items.append((cur_start, k))
            cur_start = k + 1
    items.append((cur_start, c))  # last item (may be empty after a trailing comma)
    def text(a, b):  # source text of tokens a..b-1, on one line
        first, last = toks[a], toks[b - 1]
        if first.start[0] != last.end[0]:
            return None
        return lines[first.start[0] - 1][first.start[1]:last.end[1]]
    parts = []
    for a, b in items:
        while a < b and toks[a].type == tokenize.NL:
            a += 1
        if a >= b:
            continue
        tx = text(a, b)
        if tx is None:
            return None
        parts.append(tx)
    trailing_comma = toks[c - 1].type == tokenize.OP and toks[c - 1].string == "," or (
        toks[c - 1].type == tokenize.NL and toks[c - 2].string == ",")
    col = op.end[1]
    head = lines[op.start[0] - 1][:col]
    tail = lines[cl.start[0] - 1][cl.start[1]:]
    out, cur = [], head
    for n, p in enumerate(parts):
        piece = p + ("," if n < len(parts) - 1 or trailing_comma else "")
        sep = "" if cur == head else " "
        if len(cur) + len(sep) + len(piece) <= LIMIT or cur == head:
            cur += sep + piece
        else:
            out.append(cur)
            cur = " " * col + piece
    cur += tail
    out.append(cur)
    if any(len(x) > LIMIT for x in out):
        return None
    old_n = cl.start[0] - op.start[0] + 1
    if len(out) >= old_n:
        return None
    new_lines = lines[:op.start[0] - 1] + out + lines[cl.start[0]:]
    return "\n".join(new_lines), (op.start[0], cl.start[0])

def repack(path, since):
    src = open(path).read()
    want = norm_ast(src)
    ch = changed_lines(path, since)
    done = True
    n = 0
    while done:
        done = False
        toks, gs = _groups(src)
        for o, c in sorted(gs, key=lambda g: -(toks[g[1]].start[0] - toks[g[0]].start[0])):
            span = set(range(toks[o].start[0], toks[c].start[0] + 1))
            if not span & ch:
                continue
            r = _repack_group(src, toks, o, c)
            if r is None:
                continue
            new, (a, b) = r
            if norm_ast(new) != want:
                continue
            # line numbers below shift: recompute the changed set from git
            open(path, "w").write(new)
            src = new
            ch = changed_lines(path, since)
            n += 1
            done = True
            break
    return n


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--since", default="HEAD", help="git revision the repacking compares with")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    left = wrap_main(args.files)
    for p in args.files:
        repack(p, args.since)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
