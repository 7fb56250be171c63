from oneha.cli import main

main()
