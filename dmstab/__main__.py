from dmstab.cli import main

main()
