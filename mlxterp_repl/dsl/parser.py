"""The hand-written parser: tokens to statements, one per logical line.

`parse(text)` never raises: a line that does not parse becomes a `QueryError` in the result
and parsing goes on at the next line. While it reads, the parser notes what it would have
accepted whenever it looks at the end of the text; `complete` uses those notes to list what
may come next at a cursor.
"""

from __future__ import annotations

from mlxterp.core.statements import FUNCTIONS, INTERVENTIONS, METRICS, OPTIONS, STATEMENTS, with_bodies

from mlxterp_repl.dsl import ast
from mlxterp_repl.dsl.errors import ParseResult, QueryError, closest
from mlxterp_repl.dsl.lexer import Token, tokenize

# The words of the language come from the one statement table (mlxterp.core.statements);
# these names stay importable from here for the parser's users.
WITH_BODIES = with_bodies()


def parse(text: str, should_stop=None) -> ParseResult:
    """Parse a whole text: the statements that parsed, and one error per line that did not.
    `should_stop()`, when given, is asked now and then; True raises mlxterp.errors.Interrupted."""
    parser = Parser(text, should_stop)
    return parser.parse_all()


def statement_name(node: ast.Statement) -> str:
    """The table name of a parsed statement (`Save` -> "save")."""
    return NODE_NAMES[type(node).__name__]


NODE_NAMES = {spec.node: name for name, spec in STATEMENTS.items()}


def describe(token: Token) -> str:
    if token.kind == "EOF":
        return "the end of the text"
    if token.kind == "NEWLINE":
        return "the end of the line"
    return repr(token.text)


class Parser:
    def __init__(self, source: str, should_stop=None):
        self.source = source
        self.should_stop = should_stop
        self.tokens, self.lex_errors = tokenize(source, should_stop)
        self.pos = 0
        # notes of what would be accepted at the end of the text: (kind, payload)
        self.expected: list[tuple[str, object]] = []
        self.depth = 0  # nesting of let expressions, bounded so deep input cannot overflow the stack
        self.in_with = False  # reading the interventions of a `with` (its `:` ends an intervention's position)

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
            if self.should_stop is not None and len(result.statements) % 1000 == 999 and self.should_stop():
                from mlxterp.errors import Interrupted

                raise Interrupted(f"stopped while reading the text ({len(result.statements):,} statements read)")
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
        spec = STATEMENTS[statement_name(statement)]
        options = list(spec.options)
        message = f"unexpected {describe(self.peek())} after the {spec.name} statement"
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
            if allowed is not None and self.at_line_end():  # `with ...:` then Enter, as in Python
                self.fail(f"'with' runs the statement after its ':' on the same line, and {found} came there "
                          "(a '\\' at the end of the line continues it on the next); these can follow: "
                          + ", ".join(names), names)
            suggestions = closest(token.text, names) if token.kind == "NAME" else []
            self.fail(f"{found} is not a statement; statements are: " + ", ".join(names), suggestions or names)
        self.advance()
        first = token
        spec = STATEMENTS[token.value]
        if spec.parser is not None:
            node = getattr(self, spec.parser)(first)
        else:
            node = self.table_statement(spec, first)
        node.span = self.span_from(first)
        node.text = self.source[first.start : self.previous().end]
        return node

    def table_statement(self, spec, first) -> ast.Statement:
        """A statement of the common shape: its argument, then its options (each at most once)."""
        argument = {} if spec.reads == "nothing" else {spec.field: getattr(self, "argument_" + spec.reads)()}
        node = getattr(ast, spec.node)(span=first.span, **argument)
        if spec.options:
            self.options(node, spec)
        for keyword in spec.required:
            if getattr(node, OPTIONS[keyword].field) is None:
                self.note("keyword", [keyword])
                self.fail(f"{spec.name} needs {OPTIONS[keyword].syntax()}", [keyword])
        if spec.check is not None:
            getattr(self, spec.check)(node, first)
        return node

    # ---- statement arguments (Statement.reads) ----

    def argument_path(self):
        return self.path()

    def argument_optional_path(self):
        return None if self.at_line_end() else self.path()

    def argument_path_or_var(self):
        self.note("var")
        return self.var() if self.peek().kind == "VAR" else self.path()

    def argument_string(self):
        return self.string("the text in double quotes")

    def argument_count(self):
        return self.integer("the number of tokens, a whole number like 20", minimum=1)

    def argument_optional_string(self):
        if self.at_line_end() or (self.peek().kind == "NAME" and self.peek().value in OPTIONS):
            return None  # nothing, then options (`causal subject "France"`): the current prompt
        return self.string("a text in double quotes (or nothing: the current prompt)")

    # ---- statements of a special shape (Statement.parser) and checks (Statement.check) ----

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

    def check_patch(self, node, first):
        logit_diff = node.metric is not None and node.metric.value == "logit_diff"
        if logit_diff and node.answers is None:
            self.note("keyword", ["answers"])
            self.fail('metric logit_diff needs the two answers to compare: add answers "CLEAN" "CORRUPT", '
                      'e.g. answers " Paris" " London"', ["answers"], node.metric)
        if node.answers is not None and not logit_diff:
            raise QueryError("answers go with metric logit_diff: add 'metric logit_diff'",
                             node.answers[0].span.to(node.answers[1].span), ["metric logit_diff"])

    def check_dla(self, node, first):
        if node.answer is not None and node.answers is not None:
            raise QueryError("give either answer \"A\" (its logit) or answers \"A\" \"B\" (their difference), not both",
                             node.answer.span, ["answer", "answers"])

    def check_export(self, node, first):
        if isinstance(node.source, ast.Var) and (node.position or node.input):
            self.fail("'@' and 'in' apply to a module path, not to a saved $name", token=first)

    def statement_sae(self, first):
        self.note("keyword", ["load"])
        if self.at_line_end():
            return ast.Sae(span=first.span)
        self.expect_word("load")
        source = self.string_or_word("an SAE's directory (or demo, the one bundled for the demo model)")
        return ast.Sae(span=first.span, source=source)

    def statement_heads(self, first):
        spec = STATEMENTS["heads"]
        kinds = list(spec.keywords)
        self.note("keyword", kinds)
        kind = None
        token = self.peek()
        if token.kind == "NAME" and token.value not in spec.options:
            if token.value not in kinds:
                self.fail(f"unknown head kind '{token.value}'; kinds are: " + ", ".join(kinds),
                          closest(token.value, kinds) or kinds)
            self.advance()
            kind = ast.String(span=token.span, value=token.value)
        node = ast.Heads(span=first.span, kind=kind)
        self.options(node, spec)
        return node

    def statement_with(self, first):
        self.in_with = True
        try:
            interventions = self.interventions()
        finally:
            self.in_with = False
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

    def statement_help(self, first):
        topic = None
        self.note("topic")
        if not self.at_line_end():
            token = self.expect("NAME", "a statement name", list(STATEMENTS))
            topic = ast.String(span=token.span, value=token.value)
        return ast.Help(span=first.span, topic=topic)

    # ---- options after a statement's argument (Option.reads) ----

    def options(self, node, spec):
        allowed = list(spec.options)
        seen = set()
        while True:
            left = [o for o in allowed if o not in seen and self.option_fits(node, o)]
            self.note("keyword", left)
            if self.at_line_end():
                break
            token = self.peek()
            key = "@" if token.kind == "AT" else token.value if token.kind == "NAME" else None
            if key not in allowed:
                self.fail(f"unexpected {describe(token)} in {spec.name}; options left: " + ", ".join(left), left)
            if key in seen:
                self.fail(f"'{key}' is given twice", left)
            seen.add(key)
            self.advance()
            option = OPTIONS[key]
            setattr(node, option.field, getattr(self, "option_" + option.reads)(option, token))

    def option_position(self, option, token):
        return self.position()

    def option_string(self, option, token):
        if option.keyword == "in":
            return self.string('the input text in double quotes, as in: in "Paris is"')
        return self.string(f"the {option.keyword} text in double quotes")

    def option_new_var(self, option, token):
        return self.var(new=True)

    def option_count(self, option, token):
        return self.integer("the number of tokens to show", minimum=1)

    def option_layers(self, option, token):
        return self.layers()

    def option_plot(self, option, token):
        return self.plot(token)

    def option_metric(self, option, token):
        self.note("metric")
        names = list(METRICS)
        name = self.expect("NAME", "a metric name", names)
        if name.value not in METRICS:
            self.fail(f"unknown metric '{name.value}'; metrics are: " + ", ".join(names), names, name)
        return ast.String(span=name.span, value=name.value)

    def option_file(self, option, token):
        if option.keyword == "tuned":
            return self.string_or_word("a tuned lens's directory (or demo, the one bundled for the demo model)")
        return self.string_or_word("a file name ending in .npz or .safetensors")

    def option_flag(self, option, token):
        return True

    def option_answers(self, option, token):
        return [self.string(f'the {which} answer in double quotes, as in: answers " Paris" " London"')
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

    def integer(self, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
        value, span = self.signed_number(what, integer=True)
        if minimum is not None and value < minimum:
            raise QueryError(f"{what} must be at least {minimum}", span)
        if maximum is not None and value > maximum:
            raise QueryError(f"{what} must be at most {maximum:,}, got {value}", span)
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
            if token.value == "head" and self.peek().kind == "LBRACK" and not self.peek().space_before:
                return "head" + self.head_selection()
            return token.value
        if token.kind in ("STAR", "NUMBER", "MINUS", "LBRACK"):
            return self.layer_segment()
        self.fail(f"expected a name, an index, *, A..B or [a, b] after '{prefix}', found {describe(token)}")

    def layer_segment(self) -> str:
        """`3` · `-1` · `0..7` · `[0, 4, 8]` · `*`, as text: a path's layer segment and the `layers`
        option are the same syntax; what they select is `mlxterp.core.paths.parse_layers`'s rule."""
        token = self.peek()
        if token.kind == "STAR":
            self.advance()
            return "*"
        if token.kind == "LBRACK":
            self.advance()
            items = [self.integer("a layer index")]
            while self.peek().kind == "COMMA":
                self.advance()
                items.append(self.integer("a layer index"))
            self.expect("RBRACK", "',' or ']' to close the list of layers")
            return "[" + ",".join(str(i) for i in items) + "]"
        start = self.integer("a layer index")
        if self.peek().kind == "DOTDOT":
            self.advance()
            return f"{start}..{self.integer('the last layer of the range')}"
        return str(start)

    def head_selection(self) -> str:
        """`[3]` · `[1,3]` · `[0..3]` · `[*]` after `head` (a hook point's heads: `layers.8.attn.z.head[3]`)."""
        self.expect("LBRACK", "'[' after head")
        if self.peek().kind == "STAR":
            self.advance()
            text = "*"
        else:
            items = [str(self.integer("a head index"))]
            if self.peek().kind == "DOTDOT":
                self.advance()
                items[0] += ".." + str(self.integer("the last head of the range"))
            while self.peek().kind == "COMMA":
                self.advance()
                items.append(str(self.integer("a head index")))
            text = ",".join(items)
        self.expect("RBRACK", "']' to close the head selection, as in head[3], head[1,3], head[0..3], head[*]")
        return f"[{text}]"

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
        """`3` · `0..7` · `7..0` · `[0, 4, 8]` · `*`."""
        self.note("layers")
        token = self.peek()
        if token.kind not in ("STAR", "LBRACK", "NUMBER", "MINUS"):
            self.fail(f"expected layers (3, 0..7, [0, 4, 8] or *), found {describe(token)}", ["0..7", "[0, 4, 8]", "*"])
        text = self.layer_segment()
        return ast.Layers(span=self.span_from(token), text=text)

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
        spec = INTERVENTIONS[kind.value]
        for _placeholder, reads, what in spec.arguments:
            self.intervention_argument(node, reads, what)
        if spec.tail is not None:
            keyword, _placeholder, reads, what = spec.tail
            if (self.peek().kind == "STAR") if keyword == "*" else self.is_word(keyword):
                self.advance()
                self.intervention_argument(node, reads, what)
            elif keyword.isidentifier():
                self.note("keyword", [keyword])
        self.note("keyword", ["@"])
        if self.peek().kind == "AT":
            self.intervention_position(node)
        node.span = self.span_from_token_span(target.span)
        return node

    def intervention_position(self, node: ast.Intervention) -> None:
        """`@ POSITION` after an intervention: it applies at those positions only. In `with`, the
        `:` before the query ends the position (`@ -1: lens` is position -1, not the slice `-1:`)."""
        self.advance()
        first = self.peek()
        position = self.position()
        if (self.in_with and isinstance(position, ast.Slice) and position.stop is None
                and self.previous().kind == "COLON" and self.peek().kind != "COLON"):
            self.pos -= 1
            position = ast.Index(span=self.span_from(first), value=position.start)
        node.position = position
        node.position_text = self.source[first.start:self.previous().end].replace(" ", "")

    def intervention_argument(self, node: ast.Intervention, reads: str, what: str) -> None:
        """One argument of an intervention (Intervention.arguments and .tail)."""
        if reads == "number":
            node.numbers.append(float(self.signed_number(what)[0]))
        elif reads == "integer":
            node.seed = self.integer(what, minimum=0, maximum=2**64 - 1)  # (what MLX's random key takes)
        else:
            node.var = self.var()

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
                names = list(FUNCTIONS)
                self.fail(f"unknown function '{token.value}'; functions are: " + ", ".join(names),
                          closest(token.value, names) or names)
            self.advance()
            self.expect("LPAREN", f"'(' after {token.value}")
            argument = self.expression()
            self.expect("RPAREN", "')'")
            return ast.Call(span=self.span_from(token), function=token.value, argument=argument)
        self.fail(f"expected a $name, a number, mean(...) or norm(...), found {describe(token)}")
