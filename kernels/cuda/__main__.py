from .ops import main

main()
