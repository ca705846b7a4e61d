"""`lmforge sft RECIPE` (chat fine-tuning) and `lmforge sft prepare RECIPE`, registered on the main app.

`lmforge sft RECIPE` is short for `lmforge sft train RECIPE`: a group whose first argument is not one
of its commands runs `train` with it.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from lmforge.cli import PrintOpt, RecipeArg, ResumeOpt, SetOpt, StopAtOpt, _recipe, app


class _TrainByDefault(TyperGroup):
    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


sft_app = typer.Typer(cls=_TrainByDefault, no_args_is_help=True,
                      help="Chat fine-tuning (SFT) of a pretrained model: `lmforge sft RECIPE` trains, "
                           "`lmforge sft prepare RECIPE` tokenizes the conversations for inspection.")
app.add_typer(sft_app, name="sft")


@sft_app.command("train")
def sft_train(recipe: RecipeArg, sets: SetOpt = None, print_config: PrintOpt = False, resume: ResumeOpt = False,
              fresh: Annotated[bool, typer.Option("--fresh", help="Delete the run's checkpoints and logs first")]
              = False, stop_at: StopAtOpt = None) -> None:
    """Fine-tune sft.base on sft.source's conversations → train.run_dir (default runs/<name>)."""
    from lmforge.sft import run_sft

    run_sft(_recipe(recipe, sets, print_config), resume=resume, fresh=fresh, stop_at=stop_at)


@sft_app.command("prepare")
def sft_prepare(recipe: RecipeArg, sets: SetOpt = None, print_config: PrintOpt = False) -> None:
    """Tokenize the conversations for inspection: examples.txt shows them rendered, trained spans marked.

    Writes the tokenized splits, meta.json (counts, skip reasons, supervised fraction) and examples.txt to
    sft.prepared_dir (default <run_dir>/sft_data); `lmforge sft` reuses them while they are up to date."""
    from lmforge.sft import prepare_sft

    prepare_sft(_recipe(recipe, sets, print_config))
