from esmm.cli import main

main()
