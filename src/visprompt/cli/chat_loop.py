"""`visprompt chat`: the terminal loop over `tasks.chat.Chat`.

Lines are messages, except the commands: `/image PATH` (an image for the next message), `/save FILE`,
`/reset`, `/quit`. Answers print as they are generated; Ctrl-C stops the answer (the chat goes on),
and at the prompt clears the line; Ctrl-D or `/quit` leaves. Errors (a bad image, a server that went
away) print one line and the chat goes on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import VispromptError

HELP = (
    "/image PATH adds an image to your next message; /save FILE; /reset; /quit or Ctrl-D leaves; Ctrl-C stops an answer"
)


def _command(chat, line: str) -> bool:
    """Run a /command; returns False when the chat should end."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/image":
        if not arg:
            raise VispromptError("/image needs a path")
        chat.add_image(arg)
        print(f"(image added to your next message: {Path(arg).name})")
    elif name == "/save":
        if not arg:
            raise VispromptError("/save needs a file name")
        print(f"(saved {chat.save(arg)})")
    elif name == "/reset":
        chat.reset()
        print("(conversation cleared)")
    elif name == "/help":
        print(HELP)
    else:
        raise VispromptError(f"unknown command {name}: {HELP}")
    return True


def _answer(chat, line: str) -> None:
    """Send one message and print the answer as it comes; Ctrl-C stops it. The turn is finished
    whatever happens (an error mid-answer is raised from `finish`, and the chat goes on)."""
    handle = None
    print("model> ", end="", flush=True)
    try:
        try:
            handle = chat.send(line)
            for piece in handle:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            if handle is not None:
                handle.cancel()
            print(" [stopped]", end="")
    finally:
        print(flush=True)
        if handle is not None:
            chat.finish(handle)


def run_chat(model: str, base_url: str | None, api_key: str | None, resume: Path | None, sampling: dict) -> None:
    import visprompt

    from ..tasks.chat import Chat

    assistant = visprompt.load(model, base_url=base_url, api_key=api_key)
    chat = Chat.load(resume, assistant, **sampling) if resume else Chat(assistant, **sampling)
    assistant.backend.start()  # generation in a thread: Ctrl-C reaches this loop, which cancels
    print(f"chat with {assistant.name}. {HELP}", file=sys.stderr, flush=True)
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not _command(chat, line):
                        return
                else:
                    _answer(chat, line)
            except VispromptError as exc:
                print(f"error: {exc}", flush=True)
    finally:
        assistant.backend.close()
