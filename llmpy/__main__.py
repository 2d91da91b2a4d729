"""python -m llmpy  ->  llmpy.cli.main()"""
import sys

from .cli import main

sys.exit(main())
