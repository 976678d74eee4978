/* One passing, one failing, one skipped, one expected failure (kselftest.h of 6.1). */
#include "kselftest.h"
int main(void)
{
	ksft_print_header();
	ksft_set_plan(4);
	ksft_print_msg("checking the first thing\n");
	ksft_test_result_pass("first\n");
	ksft_print_msg("second: expected 1, got 2\n");
	ksft_test_result_fail("second\n");
	ksft_test_result_skip("third: needs CONFIG_DEMO\n");
	ksft_test_result_xfail("fourth\n");
	ksft_finished();
}
