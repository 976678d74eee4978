/* A program that can run nothing here: the runner reports it skipped (exit 4). */
#include "kselftest.h"
int main(void)
{
	ksft_print_header();
	ksft_exit_skip("no demo device\n");
}
