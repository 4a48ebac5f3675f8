from discoverd.cli import main

main()
