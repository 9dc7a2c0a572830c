"""`visprompt story`: the command over `tasks.story.Story`.

The pictures given are told first, one paragraph each (then paragraphs without a picture, up to
`--turns`). Interactively, each line after that is a picture's path, or a direction for the next
paragraph ("make it funnier"; "end it" writes the ending); an empty line goes on, `/quit` or Ctrl-D
leaves. With `--save FILE` the state is saved after every paragraph.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import VispromptError

PROMPT = "story> "
HELP = "a picture's path, a direction (make it funnier; end it), an empty line to go on; /quit or Ctrl-D leaves"


def _line_to_turn(line: str) -> tuple[str | None, str | None]:
    """(image, direction) for one line typed in the story."""
    if not line:
        return None, "go on"
    if Path(line).expanduser().is_file():
        return str(Path(line).expanduser()), None
    return None, line


def run_story(
    model: str,
    base_url: str | None,
    api_key: str | None,
    images: list[str],
    turns: int | None,
    interactive: bool,
    save: Path | None,
    resume: Path | None,
    sampling: dict,
) -> None:
    import visprompt

    from ..tasks.story import Story, StoryState

    if not images and not resume and not interactive:
        raise VispromptError("give the story's pictures (or --resume FILE, or --interactive)")
    state = StoryState.load(resume) if resume else None
    story = Story(visprompt.load(model, base_url=base_url, api_key=api_key), state, **sampling)

    def tell(image: str | None, direction: str | None) -> None:
        print(story.turn(image, direction), flush=True)
        if save is not None:
            story.state.save(save)

    todo = len(images) if turns is None else turns
    for i in range(todo):
        tell(images[i] if i < len(images) else None, None if i < len(images) else "go on")
    if not interactive:
        return
    print(HELP, flush=True)
    while not story.state.ended:
        try:
            line = input(PROMPT).strip()
        except EOFError:
            print()
            return
        if line in ("/quit", "/exit"):
            return
        image, direction = _line_to_turn(line)
        if image is None and not story.state.plot and direction:
            print("error: a story begins with a picture", flush=True)
            continue
        try:
            tell(image, direction)
        except VispromptError as exc:
            print(f"error: {exc}", flush=True)
    print("The end.", flush=True)
