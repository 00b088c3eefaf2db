"""Reading Inductor's generated code in tests: which buffers a call in the backward gets."""

from __future__ import annotations


def top_level_args(call: str) -> list[str]:
    """The arguments of the outermost call on a line of generated code, as text."""
    inner, depth, args, current = call[call.index("(") + 1:call.rindex(")")], 0, [], ""
    for ch in inner:
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += ch
    return [*args, current.strip()]


def saved_inputs_and_op_line(code: str) -> tuple[list[str], str]:
    """The backward graph's input names and the line calling the in-place reference op in
    Inductor's generated backward code."""
    call = code[code.index("def call(self, args):"):]
    inputs = [n.strip() for n in call.splitlines()[1].split("=")[0].split(",") if n.strip()]
    [line] = [ln for ln in call.splitlines() if "swiglu_backward_reference_.default(" in ln]
    return inputs, line
