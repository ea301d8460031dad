"""The app layer: what a user runs. The command line (cli), the pipelines' registry
(pipelines), `kvant generate` (generate), `kvant serve` (serve), releases (release, with
their cards in release_cards and the rehearsal's report in rehearsal).

It may import every other layer; nothing below it imports it.
"""
