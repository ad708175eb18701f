"""The hand-written parser: tokens to statements, one per logical line.

`parse(text)` never raises: a line that does not parse becomes a `QueryError` in the result
and parsing goes on at the next line. While it reads, the parser notes what it would have
accepted whenever it looks at the end of the text; `complete` uses those notes to list what
may come next at a cursor.
"""

from __future__ import annotations

from mlxterp_repl.dsl import ast
from mlxterp_repl.dsl.errors import ParseResult, QueryError, closest
from mlxterp_repl.dsl.lexer import Token, tokenize

# name -> (syntax, what it does); the order is the order of `help`
STATEMENTS = {
    "load": ("load SOURCE [layers=ATTR]", "load a model: demo, a local mlx-lm directory or a hub id"),
    "prompt": ('prompt "TEXT"', "set the session's current input"),
    "tokens": ('tokens ["TEXT"]', "table of position, id and text of each token"),
    "save": ('save PATH [@ POSITION] [in "TEXT"] [as $NAME]', "capture activations and summarise them"),
    "lens": ('lens [@ POSITION] [top K] [layers LAYERS] [in "TEXT"] [plot [to FILE]]', "logit lens"),
    "predict": ('predict PATH|$NAME [@ POSITION] [top K] [in "TEXT"]', "top tokens a hidden state decodes to"),
    "patch": (
        'patch COMPONENT clean "TEXT" corrupt "TEXT" [@ POSITION] [metric NAME] [answers "A" "B"] [layers LAYERS] '
        '[plot [to FILE]]',
        "activation-patching sweep over layers (and positions, with @): recovery %",
    ),
    "with": ("with INTERVENTION {, INTERVENTION}: STATEMENT", "run one query under interventions"),
    "steer": ("steer INTERVENTION {, INTERVENTION} | steer clear | steer", "interventions kept on until cleared"),
    "let": ("let $NAME = EXPRESSION", "arithmetic on saved results: + - * /, mean(), norm()"),
    "ls": ("ls [PATH]", "module tree: names, types, parameter counts"),
    "stats": ('stats PATH [@ POSITION] [in "TEXT"]', "one row of statistics per module"),
    "export": ('export $NAME|PATH [@ POSITION] [in "TEXT"] to FILE', "write arrays to .npz or .safetensors"),
    "info": ("info", "model summary"),
    "help": ("help [STATEMENT]", "this list, or help for one statement"),
}

# statements that may follow `with ...:` (those that run the model on an input)
WITH_BODIES = ["save", "lens", "predict", "stats", "export"]
INTERVENTIONS = {
    "zero": "zero",
    "scale": "scale K",
    "clamp": "clamp LO HI",
    "noise": "noise STD [seed N]",
    "add": "add $v [* K]",
    "replace": "replace $x",
}
FUNCTIONS = ["mean", "norm"]
METRICS = ["l2", "mse", "cosine", "logit_diff"]
# option keyword -> what follows it, per statement
OPTIONS = {
    "save": ["@", "in", "as"],
    "lens": ["@", "top", "layers", "in", "plot"],
    "predict": ["@", "top", "in"],
    "patch": ["clean", "corrupt", "@", "metric", "answers", "layers", "plot"],
    "stats": ["@", "in"],
    "export": ["@", "in", "to"],
}


def parse(text: str) -> ParseResult:
    """Parse a whole text: the statements that parsed, and one error per line that did not."""
    parser = Parser(text)
    return parser.parse_all()


def describe(token: Token) -> str:
    if token.kind == "EOF":
        return "the end of the text"
    if token.kind == "NEWLINE":
        return "the end of the line"
    return repr(token.text)


class Parser:
    def __init__(self, source: str):
        self.source = source
        self.tokens, self.lex_errors = tokenize(source)
        self.pos = 0
        # notes of what would be accepted at the end of the text: (kind, payload)
        self.expected: list[tuple[str, object]] = []
        self.depth = 0  # nesting of let expressions, bounded so deep input cannot overflow the stack

    # ---- token helpers ----

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def advance(self) -> Token:
        token = self.peek()
        if token.kind != "EOF":
            self.pos += 1
        return token

    def previous(self) -> Token:
        return self.tokens[self.pos - 1]

    def note(self, kind: str, payload=None) -> None:
        if self.peek().kind == "EOF":
            self.expected.append((kind, payload))

    def at_line_end(self) -> bool:
        return self.peek().kind in ("NEWLINE", "EOF")

    def is_word(self, *words: str) -> bool:
        token = self.peek()
        return token.kind == "NAME" and token.value in words

    def fail(self, message: str, suggestions=None, token: Token | None = None):
        token = token or self.peek()
        raise QueryError(message, token.span, suggestions)

    def expect(self, kind: str, what: str, suggestions=None) -> Token:
        if self.peek().kind != kind:
            self.fail(f"expected {what}, found {describe(self.peek())}", suggestions)
        return self.advance()

    def expect_word(self, word: str) -> Token:
        self.note("keyword", [word])
        if not self.is_word(word):
            self.fail(f"expected '{word}', found {describe(self.peek())}", [word])
        return self.advance()

    def span_from(self, first: Token):
        return first.span.to(self.previous().span)

    # ---- top level ----

    def parse_all(self) -> ParseResult:
        result = ParseResult(errors=list(self.lex_errors))
        bad_lines = {e.span.line for e in self.lex_errors}
        while True:
            while self.peek().kind == "NEWLINE":
                self.advance()
            if self.peek().kind == "EOF":
                if self.pos == 0 or self.previous().kind == "NEWLINE":
                    self.note("statement")
                break
            try:
                statement = self.statement()
                if not self.at_line_end():
                    self.trailing_error(statement)
                if not any(statement.span.line <= line <= statement.span.end_line for line in bad_lines):
                    result.statements.append(statement)
            except QueryError as error:
                result.errors.append(error)
                while not self.at_line_end():
                    self.advance()
        result.errors.sort(key=lambda e: (e.span.line, e.span.col))
        return result

    def trailing_error(self, statement):
        name = type(statement).__name__.lower()
        options = OPTIONS.get(name, [])
        message = f"unexpected {describe(self.peek())} after the {name} statement"
        if options:
            message += "; it takes: " + ", ".join(options)
        self.fail(message, options)

    def statement(self, allowed=None) -> ast.Statement:
        self.note("statement", allowed)
        token = self.peek()
        names = allowed or list(STATEMENTS)
        if token.kind != "NAME" or token.value not in names:
            if token.kind == "NAME" and token.value in STATEMENTS:
                message = f"'{token.value}' cannot follow 'with'; these can: " + ", ".join(names)
                self.fail(message, names)
            found = describe(token) if token.kind != "NAME" else f"'{token.value}'"
            suggestions = closest(token.text, names) if token.kind == "NAME" else []
            self.fail(f"{found} is not a statement; statements are: " + ", ".join(names), suggestions or names)
        self.advance()
        first = token
        node = getattr(self, "statement_" + token.value)(first)
        node.span = self.span_from(first)
        node.text = self.source[first.start : self.previous().end]
        return node

    # ---- statements ----

    def statement_load(self, first):
        source = self.string_or_word("a model: demo, a directory or a hub id")
        options = {}
        while not self.at_line_end():
            self.note("keyword", ["layers="])
            key = self.expect("NAME", "an option like layers=ATTR", ["layers="])
            if key.value != "layers":
                self.fail(f"unknown load option '{key.value}'", ["layers="], key)
            self.expect("EQUALS", "'=' after the option name")
            options[key.value] = self.string_or_word("a value").value
        return ast.Load(span=first.span, source=source, options=options)

    def statement_prompt(self, first):
        return ast.Prompt(span=first.span, prompt=self.string("the prompt text in double quotes"))

    def statement_tokens(self, first):
        text = None
        if not self.at_line_end():
            text = self.string("a text in double quotes (or nothing: the current prompt)")
        return ast.Tokens(span=first.span, input=text)

    def statement_save(self, first):
        target = self.path()
        node = ast.Save(span=first.span, target=target)
        self.options(node, "save")
        return node

    def statement_lens(self, first):
        node = ast.Lens(span=first.span)
        self.options(node, "lens")
        return node

    def statement_predict(self, first):
        self.note("var")
        target = self.var() if self.peek().kind == "VAR" else self.path()
        node = ast.Predict(span=first.span, target=target)
        self.options(node, "predict")
        return node

    def statement_patch(self, first):
        component = self.path(what="a component like mlp, attn or mlp.gate_proj")
        node = ast.Patch(span=first.span, component=component)
        self.options(node, "patch")
        for option in ("clean", "corrupt"):
            if getattr(node, option) is None:
                self.note("keyword", [option])
                self.fail(f"patch needs {option} \"TEXT\"", [option])
        logit_diff = node.metric is not None and node.metric.value == "logit_diff"
        if logit_diff and node.answers is None:
            self.note("keyword", ["answers"])
            self.fail('metric logit_diff needs the two answers to compare: add answers "CLEAN" "CORRUPT", '
                      'e.g. answers " Paris" " London"', ["answers"], node.metric)
        if node.answers is not None and not logit_diff:
            raise QueryError("answers go with metric logit_diff: add 'metric logit_diff'",
                             node.answers[0].span.to(node.answers[1].span), ["metric logit_diff"])
        return node

    def statement_with(self, first):
        interventions = self.interventions()
        self.note("keyword", [":", ","])
        self.expect("COLON", "',' and another intervention, or ':' and the query to run", [",", ":"])
        body = self.statement(allowed=WITH_BODIES)
        return ast.With(span=first.span, interventions=interventions, body=body)

    def statement_steer(self, first):
        self.note("keyword", ["clear"])
        if self.is_word("clear") and self.peek(1).kind in ("NEWLINE", "EOF"):
            self.advance()
            return ast.Steer(span=first.span, interventions=[], clear=True)
        if self.at_line_end():
            self.note("path", "")
            return ast.Steer(span=first.span, interventions=[])
        return ast.Steer(span=first.span, interventions=self.interventions())

    def statement_let(self, first):
        name = self.var(new=True)
        self.expect("EQUALS", "'=' after the name")
        return ast.Let(span=first.span, name=name, expr=self.expression())

    def statement_ls(self, first):
        path = None if self.at_line_end() else self.path()
        return ast.Ls(span=first.span, path=path)

    def statement_stats(self, first):
        node = ast.Stats(span=first.span, target=self.path())
        self.options(node, "stats")
        return node

    def statement_export(self, first):
        self.note("var")
        source = self.var() if self.peek().kind == "VAR" else self.path()
        node = ast.Export(span=first.span, source=source, file=None)
        self.options(node, "export")
        if node.file is None:
            self.note("keyword", ["to"])
            self.fail("export needs 'to FILE' (.npz or .safetensors)", ["to"])
        if isinstance(source, ast.Var) and (node.position or node.input):
            self.fail("'@' and 'in' apply to a module path, not to a saved $name", token=first)
        return node

    def statement_info(self, first):
        return ast.Info(span=first.span)

    def statement_help(self, first):
        topic = None
        self.note("topic")
        if not self.at_line_end():
            token = self.expect("NAME", "a statement name", list(STATEMENTS))
            topic = ast.String(span=token.span, value=token.value)
        return ast.Help(span=first.span, topic=topic)

    # ---- options after a statement's main argument ----

    def options(self, node, statement: str):
        allowed = OPTIONS[statement]
        seen = set()
        while True:
            left = [o for o in allowed if o not in seen and self.option_fits(node, o)]
            self.note("keyword", left)
            if self.at_line_end():
                break
            token = self.peek()
            key = "@" if token.kind == "AT" else token.value if token.kind == "NAME" else None
            if key not in allowed:
                self.fail(f"unexpected {describe(token)} in {statement}; options left: " + ", ".join(left), left)
            if key in seen:
                self.fail(f"'{key}' is given twice", left)
            seen.add(key)
            self.advance()
            if key == "@":
                node.position = self.position()
            elif key == "in":
                node.input = self.string('the input text in double quotes, as in: in "Paris is"')
            elif key == "as":
                node.name = self.var(new=True)
            elif key == "top":
                node.top = self.integer("the number of tokens to show", minimum=1)
            elif key == "layers":
                node.layers = self.layers()
            elif key == "plot":
                node.plot = self.plot(token)
            elif key in ("clean", "corrupt"):
                setattr(node, key, self.string(f"the {key} text in double quotes"))
            elif key == "metric":
                self.note("metric")
                name = self.expect("NAME", "a metric name", METRICS)
                if name.value not in METRICS:
                    self.fail(f"unknown metric '{name.value}'; metrics are: " + ", ".join(METRICS), METRICS, name)
                node.metric = ast.String(span=name.span, value=name.value)
            elif key == "to":
                node.file = self.string_or_word("a file name ending in .npz or .safetensors")
            elif key == "answers":
                node.answers = [self.string(f'the {which} answer in double quotes, as in: answers " Paris" " London"')
                                for which in ("clean", "corrupted")]

    @staticmethod
    def option_fits(node, option: str) -> bool:
        """Whether `option` can still follow: `answers` only goes with metric logit_diff."""
        if option == "answers":
            return getattr(node, "metric", None) is None or node.metric.value == "logit_diff"
        return True

    def plot(self, first):
        if self.is_word("to"):
            self.advance()
            file = self.string_or_word("a .png file name")
            return ast.Plot(span=self.span_from(first), file=file.value)
        self.note("keyword", ["to"])
        return ast.Plot(span=first.span, file=None)

    # ---- pieces ----

    def string(self, what: str) -> ast.String:
        self.note("string", what)
        token = self.expect("STRING", what)
        return ast.String(span=token.span, value=token.value)

    def string_or_word(self, what: str) -> ast.String:
        """A double-quoted string, or a bare word running to the next space (paths, hub ids)."""
        self.note("file", what)
        if self.peek().kind == "STRING":
            return self.string(what)
        if self.at_line_end():
            self.fail(f"expected {what}, found {describe(self.peek())}")
        first = self.advance()
        while not self.at_line_end() and not self.peek().space_before and self.peek().kind != "STRING":
            self.advance()
        last = self.previous()
        if first.kind == "EQUALS":
            self.fail(f"expected {what}, found '='", token=first)
        return ast.String(span=first.span.to(last.span), value=self.source[first.start : last.end])

    def signed_number(self, what: str, integer: bool = False):
        self.note("number", what)
        first = self.peek()
        sign = 1
        if first.kind in ("MINUS", "PLUS"):
            sign = -1 if first.kind == "MINUS" else 1
            self.advance()
        token = self.peek()
        if token.kind != "NUMBER" or (integer and not isinstance(token.value, int)):
            self.fail(f"expected {what}, found {describe(token)}")
        self.advance()
        return sign * token.value, first.span.to(token.span)

    def integer(self, what: str, minimum: int | None = None) -> int:
        value, span = self.signed_number(what, integer=True)
        if minimum is not None and value < minimum:
            raise QueryError(f"{what} must be at least {minimum}", span)
        return value

    def var(self, new: bool = False) -> ast.Var:
        if not new:
            self.note("var")
        token = self.expect("VAR", "a $name")
        if token.value == "":
            self.fail("a $name needs letters after the $, like $x", token=token)
        return ast.Var(span=token.span, name=token.value)

    def path(self, what: str = "a module path like layers.8.mlp") -> ast.Path:
        """`segment {. segment}`; a segment is a name, an index, `*`, `A..B` or `[a, b, ...]`."""
        self.note("path", "")
        first = self.peek()
        if first.kind not in ("NAME", "NUMBER", "STAR", "LBRACK", "MINUS"):
            self.fail(f"expected {what}, found {describe(first)}")
        parts = [self.path_segment(what, "")]
        while self.peek().kind == "DOT" and not self.peek().space_before:
            self.advance()
            prefix = "".join(parts) + "."
            self.note("path", prefix)
            parts.append("." + self.path_segment(what, prefix))
        return ast.Path(span=self.span_from(first), text="".join(parts))

    def path_segment(self, what: str, prefix: str) -> str:
        token = self.peek()
        if token.kind == "NAME":
            self.advance()
            return token.value
        if token.kind == "STAR":
            self.advance()
            return "*"
        if token.kind in ("NUMBER", "MINUS"):
            start = self.integer("a layer index")
            if self.peek().kind == "DOTDOT":
                self.advance()
                return f"{start}..{self.integer('the last layer of the range')}"
            return str(start)
        if token.kind == "LBRACK":
            self.advance()
            items = [self.integer("a layer index")]
            while self.peek().kind == "COMMA":
                self.advance()
                items.append(self.integer("a layer index"))
            self.expect("RBRACK", "',' or ']' to close the list")
            return "[" + ",".join(str(i) for i in items) + "]"
        self.fail(f"expected a name, an index, *, A..B or [a, b] after '{prefix}', found {describe(token)}")

    def position(self):
        """`-1` · `3` · `"France"` · `2:5` · `[0, -1]` · `*`."""
        self.note("position")
        token = self.peek()
        if token.kind == "STAR":
            self.advance()
            return ast.AllPositions(span=token.span)
        if token.kind == "LBRACK":
            self.advance()
            items = [self.position_item()]
            while self.peek().kind == "COMMA":
                self.advance()
                items.append(self.position_item())
            self.expect("RBRACK", "',' or ']' to close the list of positions")
            return ast.PositionList(span=self.span_from(token), items=items)
        if token.kind == "COLON":
            self.advance()
            stop = self.integer("the end of the slice")
            return ast.Slice(span=self.span_from(token), start=None, stop=stop)
        if token.kind == "STRING":
            return self.position_item()
        if token.kind in ("NUMBER", "MINUS", "PLUS"):
            item = self.position_item()
            if self.peek().kind == "COLON" and not self.peek().space_before:
                self.advance()
                stop = None
                if self.peek().kind in ("NUMBER", "MINUS", "PLUS"):
                    stop = self.integer("the end of the slice")
                return ast.Slice(span=self.span_from(token), start=item.value, stop=stop)
            return item
        self.fail(
            f"expected a position, found {describe(token)}",
            ["-1", "3", '"word"', "2:5", "[0, -1]", "*"],
        )

    def position_item(self):
        token = self.peek()
        if token.kind == "STRING":
            self.advance()
            return ast.Match(span=token.span, text=token.value)
        value = self.integer("a token index like -1 or 3")
        return ast.Index(span=self.span_from(token), value=value)

    def layers(self) -> ast.Layers:
        """`3` · `0..7` · `[0, 4, 8]` · `*`."""
        self.note("layers")
        token = self.peek()
        if token.kind == "STAR":
            self.advance()
            return ast.Layers(span=token.span, indices=None)
        if token.kind == "LBRACK":
            self.advance()
            items = [self.integer("a layer index")]
            while self.peek().kind == "COMMA":
                self.advance()
                items.append(self.integer("a layer index"))
            self.expect("RBRACK", "',' or ']' to close the list of layers")
            return ast.Layers(span=self.span_from(token), indices=items)
        if token.kind not in ("NUMBER", "MINUS"):
            self.fail(f"expected layers (3, 0..7, [0, 4, 8] or *), found {describe(token)}", ["0..7", "[0, 4, 8]", "*"])
        start = self.integer("a layer index")
        if self.peek().kind == "DOTDOT":
            self.advance()
            stop = self.integer("the last layer of the range")
            indices = list(range(start, stop + 1)) if stop >= start else list(range(start, stop - 1, -1))
            if len(indices) > 100_000:
                raise QueryError("that range of layers is too long", self.span_from(token))
            return ast.Layers(span=self.span_from(token), indices=indices)
        return ast.Layers(span=self.span_from(token), indices=[start])

    def interventions(self) -> list[ast.Intervention]:
        items = [self.intervention()]
        while self.peek().kind == "COMMA":
            self.advance()
            items.append(self.intervention())
        return items

    def intervention(self) -> ast.Intervention:
        target = self.path()
        self.note("intervention")
        kind = self.peek()
        names = list(INTERVENTIONS)
        if kind.kind != "NAME" or kind.value not in INTERVENTIONS:
            found = describe(kind)
            if kind.kind == "DOT":
                found = "'.' after a space"
            self.fail(f"expected an intervention after {target.text}, found {found}", closest(kind.text, names) or names)
        self.advance()
        node = ast.Intervention(span=target.span, target=target, kind=kind.value)
        if kind.value in ("scale", "noise"):
            node.numbers = [float(self.signed_number("a number")[0])]
            if kind.value == "noise" and self.is_word("seed"):
                self.advance()
                node.seed = self.integer("a seed")
            elif kind.value == "noise":
                self.note("keyword", ["seed"])
        elif kind.value == "clamp":
            node.numbers = [float(self.signed_number("the lower bound")[0]), float(self.signed_number("the upper bound")[0])]
        elif kind.value in ("add", "replace"):
            node.var = self.var()
            if kind.value == "add" and self.peek().kind == "STAR":
                self.advance()
                node.numbers = [float(self.signed_number("a scale factor")[0])]
        node.span = self.span_from_token_span(target.span)
        return node

    def span_from_token_span(self, span):
        return span.to(self.previous().span)

    # ---- let expressions ----

    def expression(self):
        left = self.term()
        while self.peek().kind in ("PLUS", "MINUS"):
            op = self.advance()
            right = self.term()
            left = ast.BinOp(span=left.span.to(right.span), op=op.text, left=left, right=right)
        return left

    def term(self):
        left = self.unary()
        while self.peek().kind in ("STAR", "SLASH"):
            op = self.advance()
            right = self.unary()
            left = ast.BinOp(span=left.span.to(right.span), op=op.text, left=left, right=right)
        return left

    def unary(self):
        self.depth += 1
        try:
            if self.depth > 64:
                self.fail("expression nested too deeply (more than 64 levels)")
            return self.unary_inner()
        finally:
            self.depth -= 1

    def unary_inner(self):
        if self.peek().kind == "MINUS":
            first = self.advance()
            operand = self.unary()
            return ast.Negate(span=first.span.to(operand.span), operand=operand)
        return self.atom()

    def atom(self):
        self.note("var")
        self.note("function")
        token = self.peek()
        if token.kind == "NUMBER":
            self.advance()
            return ast.Number(span=token.span, value=float(token.value))
        if token.kind == "VAR":
            return self.var()
        if token.kind == "LPAREN":
            self.advance()
            inner = self.expression()
            self.expect("RPAREN", "')'")
            inner.span = self.span_from(token)
            return inner
        if token.kind == "NAME":
            if token.value not in FUNCTIONS:
                self.fail(f"unknown function '{token.value}'; functions are: " + ", ".join(FUNCTIONS), closest(token.value, FUNCTIONS) or FUNCTIONS)
            self.advance()
            self.expect("LPAREN", f"'(' after {token.value}")
            argument = self.expression()
            self.expect("RPAREN", "')'")
            return ast.Call(span=self.span_from(token), function=token.value, argument=argument)
        self.fail(f"expected a $name, a number, mean(...) or norm(...), found {describe(token)}")
