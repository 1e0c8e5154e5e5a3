"""Drive the studio's Gradio app in-process, through the very handlers its tabs wire to their components.

A benchmark or an end-to-end check on a machine without a browser (the GPU machine) builds the app with
``studio.ui.app.build_app`` and fires events by the components' ``elem_id`` ("train-start", "click"), as a page would:
the handler gets the current values of its input components, its outputs are applied to them, and events chained
with ``.then``/``.success`` follow. Values are the handlers' own (preprocessed) Python values: a File is a path, a
Dataframe a pandas frame, a Chatbot a list of messages.
"""
from __future__ import annotations

import inspect
from typing import Any


class Page:
    """One browser page on ``app``: the values its components show, and the events they fire."""

    def __init__(self, app):
        self.app = app
        self.by_id: dict[str, Any] = {}
        self.values: dict[int, Any] = {}
        self._choices: dict[int, list] = {}
        for block in app.blocks.values():
            if getattr(block, "elem_id", None):
                self.by_id[block.elem_id] = block
            value = getattr(block, "value", None)
            self.values[block._id] = value() if callable(value) else value
        self.fire_load()

    # ---- values ----------------------------------------------------------------------------------------------------
    def comp(self, elem_id: str):
        try:
            return self.by_id[elem_id]
        except KeyError:
            raise KeyError(f"no component with elem_id {elem_id!r}") from None

    def get(self, elem_id: str) -> Any:
        return self.values.get(self.comp(elem_id)._id)

    def set(self, elem_id: str, value: Any) -> None:
        self.values[self.comp(elem_id)._id] = value

    def choices(self, elem_id: str) -> list:
        """A dropdown's or radio's choices as (label, value) pairs, as the page would show them now."""
        return list(self._choices.get(self.comp(elem_id)._id, getattr(self.comp(elem_id), "choices", []) or []))

    # ---- events ----------------------------------------------------------------------------------------------------
    def fire_load(self) -> None:
        """What a page load runs: the app's load events (and the components' value functions)."""
        for fn in self._fns(self.app._id, "load"):
            self._call(fn)

    def fire(self, elem_id: str, event: str = "click", event_data: Any = None, **values) -> list:
        """Set ``values`` (elem_id -> value) and fire ``event`` on ``elem_id``; returns each handler's last output."""
        for k, v in values.items():
            self.set(k, v)
        target = self.comp(elem_id)
        fns = self._fns(target._id, event)
        if not fns:
            raise KeyError(f"{elem_id!r} has no {event!r} handler")
        return [self._call(fn, event_data) for fn in fns]

    def fire_block(self, block, event: str, event_data: Any = None) -> list:
        """Fire ``event`` on a block that has no elem_id (a Tab's "select", a Timer's "tick")."""
        return [self._call(fn, event_data) for fn in self._fns(block._id, event)]

    def has_handler(self, elem_id: str, event: str) -> bool:
        return bool(self._fns(self.comp(elem_id)._id, event))

    def fire_timers(self) -> None:
        """One tick of every timer on the page (what a page does once a second while it is open)."""
        for block in self.app.blocks.values():
            if type(block).__name__ == "Timer":
                self.fire_block(block, "tick")

    def _fns(self, block_id: int, event: str) -> list:
        return [fn for fn in self.app.fns.values() if (block_id, event) in [tuple(t) for t in fn.targets]]

    def _call(self, fn, event_data: Any = None) -> Any:
        args = [self.values.get(c._id) for c in fn.inputs]
        if fn.collects_event_data:
            args.append(event_data)
        ok = True
        result = None
        try:
            out = fn.fn(*args) if fn.fn is not None else None
            if inspect.isgenerator(out):
                for result in out:
                    self._apply(fn, result)
            else:
                result = out
                self._apply(fn, result)
        except Exception as e:  # gr.Error and friends: what the page would show as a toast
            if type(e).__name__ not in ("Error",):
                raise
            ok, result = False, e
        for after in self.app.fns.values():
            if after.trigger_after == fn._id and (ok or not after.trigger_only_on_success) \
                    and (not ok or not after.trigger_only_on_failure):
                self._call(after)
        return result

    def _apply(self, fn, result: Any) -> None:
        outputs = fn.outputs
        if not outputs:
            return
        if isinstance(result, dict) and not _is_update(result):
            pairs = [(c, v) for c, v in result.items() if hasattr(c, "_id")]
        elif len(outputs) == 1:
            pairs = [(outputs[0], result)]
        else:
            pairs = list(zip(outputs, result if result is not None else [None] * len(outputs)))
        for comp, value in pairs:
            if _is_update(value):
                if "choices" in value:
                    self._choices[comp._id] = value["choices"]
                if "value" in value:
                    self.values[comp._id] = value["value"]
            else:
                self.values[comp._id] = value


def _is_update(value: Any) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"
