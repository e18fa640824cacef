from pglive.cli import main

main()
