#include "kselftest.h"
int main(void)
{
	ksft_print_header();
	ksft_set_plan(2);
	ksft_test_result_pass("alpha\n");
	ksft_test_result_pass("beta\n");
	ksft_finished();
}
