"""A faster `nvtripy.utils.stack_info.get_stack_info`, with the same result.

nvtripy records the Python stack (up to 100 frames) of every tensor it creates, for its error messages. For each
frame it looks for the column range of the current line by scanning every position of the frame's code object,
which is most of the time spent tracing a model. The column range of a (code object, line) never changes, so this
version computes it once and remembers it.
"""

import functools
import sys
from types import CodeType

import nvtripy.utils.function_registry
from nvtripy.utils import stack_info

MAX_STACK_DEPTH = 100  # as in nvtripy 0.1.7
NVTRIPY_GET_STACK_INFO = stack_info.get_stack_info  # kept for the test that compares the two


@functools.cache
def column_range(code: CodeType, line: int) -> tuple[int, int] | None:
    """The (start, end) columns of `line` in `code` when there is exactly one, as nvtripy reports them."""
    ranges = {(start, end) for pos_line, _, start, end in code.co_positions() if pos_line == line}
    ranges = {r for r in ranges if r[0] is not None and r[1] is not None}
    return ranges.pop() if len(ranges) == 1 else None


def get_stack_info(include_code_index: int | None = None) -> stack_info.StackInfo:
    info = stack_info.StackInfo([], include_code_index)
    registry = nvtripy.utils.function_registry.__name__
    frame = sys._getframe().f_back  # the caller's frame, as nvtripy's own skips itself
    for _ in range(MAX_STACK_DEPTH):
        if frame is None:
            break
        module = frame.f_globals.get("__name__")
        function = frame.f_code.co_name
        info.append(
            stack_info.SourceInfo(
                module=module,
                file=frame.f_code.co_filename,
                line=frame.f_lineno,
                function=function,
                code=None,
                _dispatch_target=frame.f_locals["key"] if module == registry and function == "wrapper" else "",
                column_range=column_range(frame.f_code, frame.f_lineno),
            )
        )
        frame = frame.f_back
    return info


def install() -> None:
    """Replaces nvtripy's function where it is looked up: the module, and modules that imported the name."""
    import nvtripy.frontend.module.parameter

    stack_info.get_stack_info = get_stack_info
    nvtripy.frontend.module.parameter.get_stack_info = get_stack_info
